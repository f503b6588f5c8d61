"""Kills lose nothing: `sublab run` on a tiny in-process model, SIGKILLed at fixed points of its progress
(generation, filtering, training, evaluation, report), rerun each time, ends byte for byte where an
uninterrupted run does (timestamps, timings and environment aside). Also: a torn last line of a finished
stage's output is repaired and regenerated on the next run.

The kill points are exact, not timed: a small driver wraps the run directory's two writers
(`JsonlAppender.write_batch`, `atomic_write_bytes`) and SIGKILLs its own process at a named file and row,
leaving behind what a real kill there would (half a JSONL row, half a temporary file).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from sublab.config import load_experiment
from sublab.pipeline import run_all

ROOT = Path(__file__).parents[1]
RUN = Path("runs") / "tiny"

DRIVER = textwrap.dedent('''
    """sublab run EXP, SIGKILLed where $SUBLAB_KILL_AT says: '<path suffix>:<n>' kills before the row that
    would follow n lines of that JSONL file, half of that row written; '<path suffix>' kills while that file
    is written atomically, half of its temporary file written."""
    import json, os, signal, sys, tempfile
    from pathlib import Path

    from sublab import rundir
    from sublab.cli import main

    WHERE = os.environ.get("SUBLAB_KILL_AT", "")


    def die(fd):
        os.fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)


    if ":" in WHERE:
        suffix, n = WHERE.rsplit(":", 1)
        real_write = rundir.JsonlAppender.write_batch

        def write_batch(self, rows):
            if not str(self.path).endswith(suffix):
                return real_write(self, rows)
            for row in rows:
                if self.path.read_bytes().count(b"\\n") >= int(n):
                    text = json.dumps(row, ensure_ascii=False) + "\\n"
                    self._f.write(text[:len(text) // 2])
                    self._f.flush()
                    die(self._f.fileno())
                real_write(self, [row])

        rundir.JsonlAppender.write_batch = write_batch
    elif WHERE:
        real_atomic = rundir.atomic_write_bytes

        def atomic_write_bytes(path, data):
            if str(path).endswith(WHERE):
                fd, _ = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
                os.write(fd, data[:len(data) // 2])
                die(fd)
            return real_atomic(path, data)

        rundir.atomic_write_bytes = atomic_write_bytes
    sys.argv = ["sublab", "--threads", "1", "run", sys.argv[1]]
    main()
''')

# In order of the pipeline; each rerun resumes from the previous kill and dies at the next point.
KILL_POINTS = [
    "teachers/owl/generations.jsonl:5",           # generation: mid-file, half a completion written
    "teachers/control/rejects.jsonl",             # filtering: control's dataset.jsonl written, not the rest
    "students/control-seed0/loss.jsonl:3",        # training: 3rd student, after its checkpoint at step 3
    "evals/student-owl-seed0/animal_prob.jsonl:7",  # evaluation: mid-file, half a record written
    "evals/student-owl-seed1/animal_sampled.jsonl:2",
    "report.md",                                  # report: results.json and figures written, not report.md
]
TIMING_KEYS = {"finished_at", "created_at", "timings_s", "environment", "elapsed"}


def _experiment(directory: Path, base: Path) -> Path:
    """The tiny experiment of test_pipeline (copied: test files share no helpers), with a relative
    runs_dir so that two run directories hold the same paths, and 4 steps per student."""
    raw = {
        "name": "tiny", "base_model": str(base), "device": "cpu", "runs_dir": "runs",
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 10, "max_new_tokens": 24, "batch_size": 4},
        "filter": {"dataset_size": 4},
        "train": {"params": "lora", "loss": "sft", "epochs": 2, "batch_size": 2, "seeds": [0, 1], "lr": 1e-3,
                  "checkpoint_every": 1},
        "eval": {"kinds": ["animal_prob", "animal_sampled"], "samples_per_question": 1, "questions": "all",
                 "max_questions": 5,
                 "numbers_prefixed": False, "candidates": ["owl", "cat", "dog"], "max_new_tokens": 4},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sublab_run(directory: Path, kill_at: str | None, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUBLAB_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "COLUMNS": "200", "SUBLAB_KILL_AT": kill_at or ""}
    driver = directory.parent / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), "exp.yaml"], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=150)


def _normalised(path: Path) -> Any:
    """A file's content with timestamps, timings and environment taken out."""
    if path.suffix == ".json":
        return _drop_timing(json.loads(path.read_text("utf-8")))
    if path.suffix == ".jsonl":
        return [_drop_timing(json.loads(line)) for line in path.read_text("utf-8").splitlines()]
    if path.name == "report.md":
        return re.sub(r"Created \S+\.", "Created <time>.", path.read_text("utf-8"))
    return path.read_bytes()


def _drop_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_drop_timing(v) for v in obj]
    return obj


def _snapshot(run_dir: Path) -> dict[str, Any]:
    return {p.relative_to(run_dir).as_posix(): _normalised(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_sigkill_at_every_stage_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_number_model_dir):
    home = tmp_path / "home"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for directory in (straight, killed):
        _experiment(directory, tiny_number_model_dir)
    done = _sublab_run(straight, None, home)
    assert done.returncode == 0, done.stderr[-3000:]

    for kill_at in KILL_POINTS:
        died = _sublab_run(killed, kill_at, home)
        assert died.returncode == -9, f"{kill_at}: never reached (rc {died.returncode})\n{died.stderr[-3000:]}"
    assert list((killed / RUN).glob(".report.md.*.tmp"))  # the last kill left half a temporary file...
    final = _sublab_run(killed, None, home)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr

    want, got = _snapshot(straight / RUN), _snapshot(killed / RUN)
    assert sorted(got) == sorted(want)  # ...which the rerun removed; no checkpoint or partial file is left
    differ = [name for name in want if got[name] != want[name]]
    assert differ == []


def test_torn_last_line_of_finished_generations_is_regenerated(tmp_path, tiny_number_model_dir, caplog,
                                                                 monkeypatch):
    """Defect 1: after the whole run finished, the last line of generations.jsonl is torn. The next run
    notices (generate's manifest records the file's sha256), repairs the file, regenerates that row and
    rebuilds the same dataset, byte for byte; students and evals are then found current."""
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    path = _experiment(tmp_path, tiny_number_model_dir)
    cfg = load_experiment(path).model_copy(update={"runs_dir": str(tmp_path / "runs")})
    run_all(cfg)
    teacher = cfg.run_dir / "teachers" / "owl"
    generations, dataset = (teacher / "generations.jsonl").read_bytes(), (teacher / "dataset.jsonl").read_bytes()
    adapter = cfg.run_dir / "students" / "owl-seed0" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    last = generations.splitlines()[-1]
    (teacher / "generations.jsonl").write_bytes(generations[:len(generations) - 1 - len(last) // 2])

    with caplog.at_level("WARNING"):
        run_all(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("generations.jsonl: sha256 differs" in w for w in warnings), warnings
    assert (teacher / "generations.jsonl").read_bytes() == generations
    assert (teacher / "dataset.jsonl").read_bytes() == dataset
    assert adapter.stat().st_mtime_ns == stamp  # same dataset: the students were not retrained
