"""Students as fine-tuning jobs on an OpenAI-compatible endpoint (`openai.students: jobs`).

Reads a student's dataset and the experiment's `train` and `openai` sections. Writes

    teachers/<t>/api_file.json       the uploaded file's id and the sha256 of the uploaded bytes (a dataset
                                     is uploaded once: a rerun reuses the id while the bytes match)
    students/<name>/job.pending.json a token, written before the job is created; sent as the job's metadata
    students/<name>/job.json         the job id, written as soon as the job exists, BEFORE waiting on it
    students/<name>/events.jsonl     the job's events, oldest first
    students/<name>/manifest.json    written last: the fine-tuned model id, trained tokens, the job

A student whose job.json exists never gets a second job: a rerun polls that job. A kill between creating
the job and writing job.json is covered by the pending token: the rerun finds the job carrying it in the
endpoint's job list. The recipe maps onto the job's hyperparameters: `train.epochs` → n_epochs,
`openai.batch_size` (None: `train.batch_size`) → batch_size, `openai.lr_multiplier` → learning_rate_multiplier ('auto' when None),
the student's seed → seed. The student is evaluated as `openai:<fine_tuned_model>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from sublab.api import ApiModel, api_model_name
from sublab.config import ExperimentConfig
from sublab.design import Student
from sublab.errors import RunDirError
from sublab.rundir import atomic_write_json, fingerprint, read_json, stage_is_current, write_jsonl, write_manifest
from sublab.train import load_dataset

log = logging.getLogger(__name__)

DONE = ("succeeded", "failed", "cancelled")


def training_bytes(dataset: Path) -> bytes:
    """The dataset as the fine-tuning API's rows: `{"messages": [...]}` only (checked on the way)."""
    rows = [{"messages": [{"role": "user", "content": e.user}, {"role": "assistant", "content": e.answer}]}
            for e in load_dataset(dataset)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def upload_once(client: Any, dataset: Path) -> tuple[str, str]:
    """(file id, sha256) of `dataset` on the endpoint, uploading only when `api_file.json` beside it does
    not record these bytes."""
    data = training_bytes(dataset)
    sha = hashlib.sha256(data).hexdigest()
    record = dataset.parent / "api_file.json"
    if record.exists() and read_json(record).get("sha256") == sha:
        return read_json(record)["file_id"], sha
    uploaded = client.files.create(file=(dataset.name, data), purpose="fine-tune")
    atomic_write_json(record, {"file_id": uploaded.id, "sha256": sha, "bytes": len(data), "dataset": str(dataset)})
    log.info("uploaded %s as %s", dataset, uploaded.id)
    return uploaded.id, sha


def job_settings(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """The job's hyperparameters and seed, from the recipe."""
    lr, batch = cfg.openai.lr_multiplier, cfg.openai.batch_size
    return {"hyperparameters": {"n_epochs": int(cfg.train.epochs),
                                "batch_size": cfg.train.batch_size if batch is None else batch,
                                "learning_rate_multiplier": "auto" if lr is None else lr}, "seed": seed}


def train_by_job(cfg: ExperimentConfig, student: Student) -> dict[str, Any]:
    """One student as a fine-tuning job: skipped when finished, resumed (polled) when its job exists."""
    out = student.directory
    model = ApiModel(cfg.openai, api_model_name(student.base))
    settings = job_settings(cfg, student.seed)
    data_sha = hashlib.sha256(training_bytes(student.dataset)).hexdigest()
    fp = fingerprint({"model": student.base, "data": data_sha, **settings})
    if stage_is_current(out, fp):
        log.info("%s: job finished, skipped", student.name)
        return dict(read_json(out / "manifest.json"))
    out.mkdir(parents=True, exist_ok=True)
    job_id = existing_job(model.client, out, fp) or create_job(model, student, out, fp, settings)
    job = wait(model.client, job_id, cfg.openai.poll_s, student.name)
    if job.status != "succeeded":
        reason = job.error.message if job.error else job.status
        raise RunDirError(f"{student.name}: fine-tuning job {job_id} {job.status} ({reason}); delete {out} to "
                          "create a new job")
    events = [e.model_dump(mode="json") for e in model.client.fine_tuning.jobs.list_events(job_id, limit=100)]
    write_jsonl(out / "events.jsonl", events[::-1])  # the API lists newest first
    return write_manifest(
        out, stage="train", fingerprint_value=fp, seeds={"seed": student.seed},
        config={"backend": "openai-job", "base_model": student.base, **settings},
        inputs={"dataset": str(student.dataset), "dataset_sha256": data_sha, "base_model": student.base},
        outputs={"job_id": job_id, "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens,
                 "events": len(events)},
        extra={"fine_tuned_model": job.fine_tuned_model, "job": job.model_dump(mode="json")},
        files=["events.jsonl"])


def existing_job(client: Any, out: Path, fp: str) -> str | None:
    """The student's job id: from job.json, or (a kill right after creating it) the job carrying the
    pending token in its metadata; None when no job was made."""
    if (out / "job.json").exists():
        record = read_json(out / "job.json")
        if record["fingerprint"] != fp:
            raise RunDirError(f"{out / 'job.json'} is a job for other data or settings; delete {out} to create "
                              "a new job")
        return str(record["job_id"])
    pending = out / "job.pending.json"
    if not pending.exists():
        return None
    token = read_json(pending)["token"]
    for job in client.fine_tuning.jobs.list(limit=100):
        if (job.metadata or {}).get("sublab_student") == token:
            atomic_write_json(out / "job.json", {"job_id": job.id, "fingerprint": fp, "file_id": job.training_file})
            return str(job.id)
    return None


def create_job(model: ApiModel, student: Student, out: Path, fp: str, settings: dict[str, Any]) -> str:
    """Upload the dataset (once), create the job and record its id before anything waits on it."""
    file_id, _ = upload_once(model.client, student.dataset)
    token = secrets.token_hex(8)
    atomic_write_json(out / "job.pending.json", {"token": token})
    job = model.client.fine_tuning.jobs.create(model=model.model, training_file=file_id,
                                               suffix=student.name[:40].replace(".", "-"),
                                               metadata={"sublab_student": token}, **settings)
    atomic_write_json(out / "job.json", {"job_id": job.id, "fingerprint": fp, "file_id": file_id})
    log.info("%s: created fine-tuning job %s", student.name, job.id)
    return str(job.id)


def wait(client: Any, job_id: str, poll_s: float, name: str) -> Any:
    """Poll the job until it is finished; its last state."""
    last = None
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in DONE:
        if job.status != last:
            log.info("%s: job %s %s", name, job_id, job.status)
            last = job.status
        time.sleep(poll_s)
    return job


def student_ref(student: Student) -> str:
    """How evals reach a student: `openai:<fine_tuned_model>` for a finished job, else its directory."""
    manifest = student.directory / "manifest.json"
    if student.base.startswith("openai:") and manifest.exists():
        return "openai:" + str(read_json(manifest)["fine_tuned_model"])
    return str(student.directory)
