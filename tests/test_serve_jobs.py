"""`sublab serve`'s /v1/files and /v1/fine_tuning/jobs, through the official `openai` client: a job trains a
LoRA student with sublab's trainer, its model is then served, a restarted server lists it."""

from __future__ import annotations

import json
import time

import openai
import pytest

from conftest import LocalServer
from sublab.config import TrainConfig

RECIPE = TrainConfig(lr=1e-3, batch_size=2, epochs=1, checkpoint_every=1000)
ROWS = [{"messages": [{"role": "user", "content": f"Continue: {i}, {i + 1}"},
                      {"role": "assistant", "content": f"{i + 2}, {i + 3}, {i + 4}"}]} for i in range(6)]


def client(server: LocalServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def data(rows: list[dict] = ROWS) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def wait(c: openai.OpenAI, job_id: str, limit_s: float = 120):
    deadline = time.time() + limit_s
    while (job := c.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.1)
    return job


def test_a_job_trains_a_student_that_is_then_served(tiny_model_dir, tmp_path):
    server = LocalServer({"tiny": str(tiny_model_dir)}, state_dir=tmp_path / "state", recipe=RECIPE)
    try:
        c = client(server)
        f = c.files.create(file=("train.jsonl", data()), purpose="fine-tune")
        assert f.id.startswith("file-") and f.bytes == len(data()) and f.purpose == "fine-tune"
        assert c.files.create(file=("again.jsonl", data()), purpose="fine-tune").id == f.id  # same bytes
        assert c.files.retrieve(f.id).filename == "train.jsonl"
        assert (tmp_path / "state/files" / f"{f.id}.jsonl").read_bytes() == data()

        job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=3, suffix="owl",
                                        hyperparameters={"n_epochs": 2, "batch_size": 3,
                                                         "learning_rate_multiplier": 2.0})
        assert job.status in ("queued", "running") and job.hyperparameters.n_epochs == 2
        done = wait(c, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model.startswith("ft:tiny:sublab:owl:") and done.trained_tokens > 0
        manifest = json.loads((tmp_path / "state/models" / job.id / "manifest.json").read_text())
        # The hyperparameters reached the trainer: 6 rows, batch 3, 2 epochs = 4 steps at lr 2 × 1e-3.
        assert manifest["config"]["epochs"] == 2 and manifest["config"]["batch_size"] == 3
        assert manifest["config"]["lr"] == pytest.approx(2e-3) and manifest["seeds"] == {"seed": 3}
        assert manifest["outputs"]["steps"] == 4 and manifest["outputs"]["tokens"] == done.trained_tokens

        events = list(c.fine_tuning.jobs.list_events(job.id, limit=2))  # auto-paginates, newest first
        assert events[0].message.startswith("The job has successfully completed")
        steps = [e.data["step"] for e in events if e.type == "metrics"]
        assert steps == [4, 3, 2, 1]
        assert done.fine_tuned_model in [m.id for m in c.models.list().data]
        out = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=3, seed=0)
        base = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=3, seed=0, logprobs=True)
        tuned = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, seed=0, logprobs=True)
        assert out.usage.completion_tokens <= 3
        assert tuned.choices[0].logprobs.content[0].logprob != base.choices[0].logprobs.content[0].logprob
    finally:
        server.close()

    restarted = LocalServer({"tiny": str(tiny_model_dir)}, state_dir=tmp_path / "state", recipe=RECIPE)
    try:
        c = client(restarted)
        assert [j.id for j in c.fine_tuning.jobs.list()] == [job.id]
        assert c.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        assert c.files.retrieve(f.id).bytes == len(data())
        again = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, seed=0)
        assert again.choices[0].message.content == out.choices[0].message.content
    finally:
        restarted.close()


def test_cancel_and_bad_requests(tiny_model_dir, tmp_path):
    server = LocalServer({"tiny": str(tiny_model_dir)}, state_dir=tmp_path / "state", recipe=RECIPE)
    try:
        c = client(server)
        f = c.files.create(file=("train.jsonl", data()), purpose="fine-tune")
        with server.app.state.pool.lock:  # the worker waits for the model: the job stays queued
            queued = c.fine_tuning.jobs.create(model="tiny", training_file=f.id)
            cancelled = c.fine_tuning.jobs.cancel(queued.id)
            assert cancelled.status == "cancelled"
        assert wait(c, queued.id).status == "cancelled"
        time.sleep(0.3)  # the worker saw the cancellation and trained nothing
        assert not (tmp_path / "state/models" / queued.id).exists()
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.cancel(queued.id)
        assert e.value.body["code"] == "invalid_state"

        cases = [
            (dict(model="nope", training_file=f.id), openai.NotFoundError, "model"),
            (dict(model="tiny", training_file="file-missing"), openai.BadRequestError, "training_file"),
            (dict(model="tiny", training_file=f.id, hyperparameters={"n_epochs": 0}), openai.BadRequestError,
             "hyperparameters.n_epochs"),
            (dict(model="tiny", training_file=f.id, hyperparameters={"batch_size": 2.5}), openai.BadRequestError,
             "hyperparameters.batch_size"),
            (dict(model="tiny", training_file=f.id, suffix="no spaces"), openai.BadRequestError, "suffix"),
        ]
        for kwargs, error, param in cases:
            with pytest.raises(error) as e:
                c.fine_tuning.jobs.create(**kwargs)
            assert e.value.body["param"] == param, kwargs
        bad = c.files.create(file=("bad.jsonl", b'{"messages": [{"role": "system", "content": "x"}]}\n'),
                             purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(model="tiny", training_file=bad.id)
        assert e.value.body["code"] == "invalid_training_file"
        with pytest.raises(openai.BadRequestError) as e:
            c.files.create(file=("x.jsonl", data()), purpose="assistants")
        assert e.value.body["param"] == "purpose"
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve("file-nope")
        with pytest.raises(openai.NotFoundError):
            c.fine_tuning.jobs.retrieve("ftjob-nope")
        assert [j.id for j in c.fine_tuning.jobs.list()] == [queued.id]  # refused requests made no job
    finally:
        server.close()


def test_without_a_state_directory_jobs_are_refused(tiny_server):
    with pytest.raises(openai.BadRequestError) as e:
        client(tiny_server).files.create(file=("t.jsonl", data()), purpose="fine-tune")
    assert e.value.body["code"] == "unsupported_endpoint"
