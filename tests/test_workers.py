"""sublab.workers: jobs in spawned processes that split the torch threads, fail like a serial run, and die
with their parent (a kill -9 of `sublab run` must not leave a worker writing a student directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sublab.errors import ConfigError
from sublab.workers import run_jobs

ROOT = Path(__file__).resolve().parents[1]


def report_threads(tag: str) -> tuple[str, int, int]:
    import torch

    return tag, os.getpid(), torch.get_num_threads()


def fail_on(tag: str) -> str:
    if tag == "bad":
        raise ConfigError("`train.lr` must be > 0, got 0 (a user's mistake, raised in a worker)")
    return tag


def sleep_forever(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def test_jobs_run_in_other_processes_with_their_share_of_the_threads(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out = run_jobs(report_threads, [("a",), ("b",), ("c",)], 2, labels=["a", "b", "c"], desc="test")
    finally:
        torch.set_num_threads(threads)
    assert [tag for tag, _, _ in out] == ["a", "b", "c"]  # in the jobs' order
    assert all(pid != os.getpid() for _, pid, _ in out) and all(n == 2 for _, _, n in out)


def test_a_workers_error_reaches_the_caller_unchanged():
    with pytest.raises(ConfigError, match="train.lr"):
        run_jobs(fail_on, [("ok",), ("bad",)], 2, labels=["ok", "bad"], desc="test")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_their_killed_parent(tmp_path):
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", "from sublab.workers import run_jobs; from tests.test_workers import sleep_forever; "
         f"run_jobs(sleep_forever, [({str(pid_file)!r},)], 1, labels=['w'], desc='test')"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its SIGKILLed parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped by init) counts as dead
        return f.read().split(")")[-1].split()[0] != "Z"
