"""The run directory's integrity: torn JSONL tails, manifests that verify their outputs, locks."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from sublab.errors import RunDirError
from sublab.rundir import (
    JsonlAppender,
    atomic_write_text,
    cache_entry_lock,
    read_jsonl,
    run_lock,
    stage_is_current,
    verify_outputs,
    write_jsonl,
    write_manifest,
)

ROOT = Path(__file__).parents[1]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- torn tails ------------------------------------------------------------------------------

def test_torn_tail_is_cut_off_the_file_once_with_a_warning(tmp_path, caplog):
    path = tmp_path / "generations.jsonl"
    write_jsonl(path, [{"id": "a"}, {"id": "b"}])
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "compl')
    with caplog.at_level(logging.WARNING):
        assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
        assert path.read_bytes() == whole  # repaired on disk, so the next reader sees the same rows
        assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and "torn" in warning


def test_a_whole_last_row_that_only_lost_its_newline_is_kept(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    with caplog.at_level(logging.WARNING):
        assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n' and not warnings_of(caplog)
    with JsonlAppender(path) as sink:  # the appender agrees: it does not drop that row either
        sink.write_batch([{"id": "c"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_a_torn_tail_in_the_middle_of_a_file_still_fails_with_its_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(RunDirError, match=r"x\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_a_file_open_for_appending_is_never_truncated_by_a_reader(tmp_path):
    path = tmp_path / "x.jsonl"
    with JsonlAppender(path) as sink:
        sink.write_batch([{"id": "a"}])
        sink._f.write('{"id": "b", "par')  # a row the writer is still writing
        sink._f.flush()
        assert read_jsonl(path) == [{"id": "a"}]
        assert path.read_bytes().endswith(b'"par')  # left for its writer to finish
        sink._f.write('t": 1}\n')
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


def test_appender_truncates_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "x"')
    with JsonlAppender(path) as sink:
        sink.write_batch([{"id": "b"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


def test_non_utf8_jsonl_is_a_one_line_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(RunDirError, match=r"x\.jsonl: not UTF-8"):
        read_jsonl(path)


# --- verified manifests ----------------------------------------------------------------------

def _finished_stage(directory: Path) -> None:
    write_jsonl(directory / "dataset.jsonl", [{"id": "a"}])
    atomic_write_text(directory / "sub" / "weights.bin", "w")
    write_manifest(directory, stage="test", config={}, fingerprint_value="fp",
                   files=["dataset.jsonl", directory / "sub" / "weights.bin"])


def test_manifest_records_output_hashes_and_skip_verifies_them(tmp_path, caplog):
    _finished_stage(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files_sha256"]) == {"dataset.jsonl", "sub/weights.bin"}
    assert verify_outputs(tmp_path) == []
    assert stage_is_current(tmp_path, "fp") and not stage_is_current(tmp_path, "other")

    (tmp_path / "dataset.jsonl").write_text('{"id": "b"}\n')
    (tmp_path / "sub" / "weights.bin").unlink()
    assert verify_outputs(tmp_path) == ["dataset.jsonl: sha256 differs", "sub/weights.bin: missing"]
    with caplog.at_level(logging.WARNING):
        assert not stage_is_current(tmp_path, "fp")
    (warning,) = warnings_of(caplog)
    assert "dataset.jsonl: sha256 differs" in warning and "sub/weights.bin: missing" in warning


def test_manifest_without_recorded_files_still_skips(tmp_path):
    write_manifest(tmp_path, stage="old", config={}, fingerprint_value="fp")
    assert stage_is_current(tmp_path, "fp")
    (tmp_path / "manifest.json").write_text("{not json")
    assert not stage_is_current(tmp_path, "fp")
    assert verify_outputs(tmp_path) == ["manifest.json: missing or unreadable"]


# --- locks -----------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sublab.rundir import {lock}
    with {lock}(Path(sys.argv[1])):
        if len(sys.argv) > 3:
            time.sleep(float(sys.argv[3]))
            Path(sys.argv[1], "built").mkdir(parents=True)
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _hold(lock: str, path: Path, seconds: float, *args: str) -> subprocess.Popen:
    """A second process holding `lock(path)`; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(lock=lock), str(path), str(seconds), *args],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if not args:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_is_reentrant_and_cleans_what_a_killed_writer_left(tmp_path):
    stale = tmp_path / "teachers" / "owl" / ".dataset.jsonl.abc123.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("half")
    with run_lock(tmp_path):
        assert not stale.exists()
        with run_lock(tmp_path):  # run_all calls the stage functions, which lock too
            pass
        with run_lock(tmp_path):
            pass
    proc = _hold("run_lock", tmp_path, 0)  # released: another process takes it
    proc.wait(timeout=30)


def test_a_second_process_gets_one_line_naming_the_holder_and_a_killed_holder_blocks_nothing(
        tmp_path, tiny_model_dir):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "x", "base_model": str(tiny_model_dir), "device": "cpu",
                                   "runs_dir": str(tmp_path / "runs"),
                                   "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"},
                                                {"name": "control", "kind": "control"}]}))
    run_dir = tmp_path / "runs" / "x"
    holder = _hold("run_lock", run_dir, 120)
    try:
        second = subprocess.run([sys.executable, "-m", "sublab.cli", "generate", str(exp)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"{run_dir} is in use by pid {holder.pid} (" in lines[0]
        assert "wait for it or stop it" in lines[0] and "started" in lines[0]
        with pytest.raises(RunDirError, match=f"in use by pid {holder.pid}"):
            with run_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid  # its record is still there
    with run_lock(run_dir):  # but the kernel dropped its lock
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()


def test_a_cache_entry_being_built_makes_a_second_process_wait_then_reuse_it(tmp_path, caplog):
    entry = tmp_path / "teachers" / "abc"
    holder = _hold("cache_entry_lock", entry, 0, "1.5")  # builds for 1.5 s under the lock
    try:
        deadline = time.time() + 60
        while not (entry.with_name("abc.lock")).exists() or not entry.with_name("abc.lock").read_text():
            assert time.time() < deadline
            time.sleep(0.05)
        with caplog.at_level(logging.INFO, logger="sublab.rundir"):
            with cache_entry_lock(entry):
                assert (entry / "built").is_dir()  # the first process finished before we got in
        assert any(f"waiting for pid {holder.pid}" in r.getMessage() for r in caplog.records)
    finally:
        holder.kill()
        holder.wait(timeout=30)
