"""Students as fine-tuning jobs (`openai.students: jobs`, `sublab.api_students`) against `sublab serve` in
the test process: an experiment runs to a report; a client SIGKILLed while waiting on a job and rerun
creates no second job (the server counts job creations) and finishes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import LocalServer
from sublab.config import TrainConfig, validate_experiment
from sublab.errors import ConfigError
from sublab.rundir import read_json, read_jsonl
from test_openai_backend import FAKE_KEY, _raw

ROOT = Path(__file__).parents[1]

DRIVER = textwrap.dedent('''
    """`sublab run EXP`; with $SUBLAB_KILL_WAITING, SIGKILLed as it starts waiting on its first job."""
    import os, signal, sys

    from sublab import api_students
    from sublab.cli import main

    if os.environ.get("SUBLAB_KILL_WAITING"):
        def wait(client, job_id, poll_s, name):
            client.fine_tuning.jobs.retrieve(job_id)
            os.kill(os.getpid(), signal.SIGKILL)

        api_students.wait = wait
    sys.argv = ["sublab", "--threads", "1", "run", sys.argv[1]]
    main()
''')


def _jobs_raw(base_url: str, local: Path) -> dict:
    raw = _raw(base_url, local)
    raw["openai"] = {"base_url": base_url, "students": "jobs", "lr_multiplier": 1.0, "poll_s": 0.1, "concurrency": 3}
    return raw


def _run(directory: Path, home: Path, kill: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUBLAB_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "COLUMNS": "200", "SUBLAB_KILL_WAITING": "1" if kill else "", "OPENAI_API_KEY": FAKE_KEY}
    (directory / "driver.py").write_text(DRIVER)
    return subprocess.run([sys.executable, "driver.py", "exp.yaml"], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=300)


def _posts(server: LocalServer, path: str) -> list[dict]:
    return [r for r in server.requests if r["method"] == "POST" and r["path"] == path]


def test_students_as_jobs_end_to_end_killed_while_waiting(tiny_number_model_dir, tmp_path):
    recipe = TrainConfig(lr=1e-3, checkpoint_every=1000)
    server = LocalServer({"tiny": str(tiny_number_model_dir)}, state_dir=tmp_path / "state", recipe=recipe,
                         api_key=FAKE_KEY)  # the server refuses any other key: proves it is sent
    try:
        (tmp_path / "exp.yaml").write_text(yaml.safe_dump(_jobs_raw(server.base_url, tiny_number_model_dir)))
        run_dir = tmp_path / "runs" / "api"
        killed = _run(tmp_path, tmp_path / "home", kill=True)
        assert killed.returncode == -9, killed.stderr[-2000:]
        first = read_json(run_dir / "students/owl-seed0/job.json")  # written before waiting
        assert len(_posts(server, "/v1/fine_tuning/jobs")) == 1
        assert not (run_dir / "students/owl-seed0/manifest.json").exists()

        done = _run(tmp_path, tmp_path / "home", kill=False)
        assert done.returncode == 0, done.stderr[-3000:]
        creations = _posts(server, "/v1/fine_tuning/jobs")
        assert len(creations) == 2, "one job per student (owl, control), none twice"
        assert len(_posts(server, "/v1/files")) == 2  # each dataset uploaded once
        assert read_json(run_dir / "students/owl-seed0/job.json") == first
        jobs = server.app.state.jobs.jobs
        assert sorted(j.obj["status"] for j in jobs.values()) == ["succeeded", "succeeded"]

        for student, teacher in (("owl-seed0", "owl"), ("control-seed0", "control")):
            manifest = read_json(run_dir / f"students/{student}/manifest.json")
            job = jobs[manifest["outputs"]["job_id"]].obj
            assert manifest["fine_tuned_model"] == job["fine_tuned_model"]
            assert manifest["outputs"]["trained_tokens"] == job["trained_tokens"] > 0
            assert job["hyperparameters"] == {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
            assert job["seed"] == 0
            events = read_jsonl(run_dir / f"students/{student}/events.jsonl")
            assert events[0]["message"].startswith("Created") and "successfully" in events[-1]["message"]
            assert read_json(run_dir / f"teachers/{teacher}/api_file.json")["file_id"] == job["training_file"]
            # the student was evaluated through the server, as openai:<its fine-tuned model>
            assert len(read_jsonl(run_dir / f"evals/student-{teacher}-seed0/animal_sampled.jsonl")) == 2 * 3
        chat_models = Counter(r["request"]["model"] for r in read_jsonl(run_dir / "evals/api_cache.jsonl"))
        assert sum(n for m, n in chat_models.items() if m.startswith("ft:tiny:sublab:")) == 2 * 2
        assert (run_dir / "report.md").is_file() and (run_dir / "results.json").is_file()

        again = _run(tmp_path, tmp_path / "home", kill=False)  # all current: no job, no upload, no request
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(_posts(server, "/v1/fine_tuning/jobs")) == 2 and len(_posts(server, "/v1/files")) == 2

        # The key reached the server but no file (run directory, server state) and no output.
        assert [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()] == []
        for proc in (killed, done, again):
            assert FAKE_KEY not in proc.stdout + proc.stderr
    finally:
        server.close()


def test_config_for_students_as_jobs(tiny_model_dir):
    raw = _jobs_raw("http://127.0.0.1:1/v1", tiny_model_dir)
    assert validate_experiment(raw).openai.students == "jobs"  # no local_weights needed
    with pytest.raises(ConfigError, match="openai.students: jobs` needs an openai: base_model"):
        validate_experiment({**raw, "base_model": str(tiny_model_dir)})
