"""`sublab serve`'s files and fine-tuning jobs: `/v1/files` and `/v1/fine_tuning/jobs`, run by sublab's
own trainer (`sublab.train.train_student`) in one background worker thread.

Reads and writes the server's state directory (`sublab serve --state-dir`, default `$SUBLAB_HOME/serve`):

    files/<file id>.jsonl           an uploaded training file, byte for byte
    files/<file id>.json            its OpenAI file object (+ its sha256: the same bytes get the same id)
    jobs/<job id>.json              the job object, rewritten atomically at every status change
    jobs/<job id>.events.jsonl      its events, appended (one per step: the training loss)
    models/<job id>/                the student (`train_student`'s directory: adapter, loss, manifest)

A job trains a LoRA student (the server's recipe, `TrainConfig()` unless given) on the served base
model. The request's hyperparameters map onto the recipe: `n_epochs` → `epochs`, `batch_size` →
`batch_size`, `learning_rate_multiplier` × the recipe's `lr` → `lr` ("auto" or absent: the recipe's
value); `seed` (absent: a random one, recorded) → the student's seed. A succeeded job's
`fine_tuned_model` (`ft:<model>:sublab:<suffix>:<job hex>`) is served by `/v1/chat/completions`. After a
restart finished jobs are listed and their models served again; queued or running ones are queued again
and resume from the trainer's last checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

from sublab.config import TrainConfig
from sublab.errors import SublabError
from sublab.rundir import JsonlAppender, atomic_write_json, read_json, read_jsonl

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,40}")
MAX_EPOCHS, MAX_BATCH = 50, 256


class JobCancelled(Exception):
    """Raised from the trainer's step hook when the job was cancelled while running."""


class ApiError(Exception):
    """A request the server refuses, rendered as the OpenAI API's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}



# --- multipart uploads ------------------------------------------------------------------------------

def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body → {field: (filename, bytes)} (the standard library's MIME parser; sublab
    serve does not depend on python-multipart)."""
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "Uploads must be multipart/form-data with 'file' and 'purpose' fields.",
                         param="file", code="invalid_value")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


# --- files --------------------------------------------------------------------------------------------

class FileStore:
    """Uploaded files under `root/files`; identical bytes keep their first id."""

    def __init__(self, root: Path):
        self.dir = root / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.objects = {p.stem: read_json(p) for p in self.dir.glob("*.json")}

    def create(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        """Store an upload and return its file object (an existing one for the same bytes and purpose)."""
        if purpose != "fine-tune":
            raise ApiError(400, f"Invalid purpose '{purpose}': sublab serve accepts 'fine-tune' only.",
                             param="purpose", code="invalid_value")
        if not data:
            raise ApiError(400, "The uploaded file is empty.", param="file", code="invalid_value")
        sha = hashlib.sha256(data).hexdigest()
        with self.lock:
            for obj in self.objects.values():
                if obj["sha256"] == sha and obj["purpose"] == purpose:
                    return public_file(obj)
            file_id = f"file-{secrets.token_hex(12)}"
            (self.dir / f"{file_id}.jsonl").write_bytes(data)
            obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                   "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                   "expires_at": None, "sha256": sha}
            atomic_write_json(self.dir / f"{file_id}.json", obj)  # written last: an object means a whole file
            self.objects[file_id] = obj
        return public_file(obj)

    def get(self, file_id: str) -> dict[str, Any]:
        if file_id not in self.objects:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return public_file(self.objects[file_id])

    def path(self, file_id: str) -> Path:
        return self.dir / f"{file_id}.jsonl"


def public_file(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "sha256"}


# --- jobs ------------------------------------------------------------------------------------------------

@dataclass
class Job:
    obj: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)


def parse_hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    """The request's hyperparameters (top-level, or under `method.supervised`), checked; "auto" kept."""
    method = body.get("method") or {}
    if method and method.get("type", "supervised") != "supervised":
        raise ApiError(400, f"method.type '{method.get('type')}' is not supported by sublab serve; use "
                         "'supervised'.", param="method.type", code="unsupported_parameter")
    hp = dict(body.get("hyperparameters") or (method.get("supervised") or {}).get("hyperparameters") or {})
    limits = {"n_epochs": (int, 1, MAX_EPOCHS), "batch_size": (int, 1, MAX_BATCH),
              "learning_rate_multiplier": (float, 1e-6, 100.0)}
    unknown = sorted(set(hp) - set(limits))
    if unknown:
        raise ApiError(400, f"Unknown hyperparameter '{unknown[0]}'.", param=f"hyperparameters.{unknown[0]}",
                         code="invalid_value")
    out: dict[str, Any] = {}
    for name, (kind, lo, hi) in limits.items():
        value = hp.get(name, "auto")
        ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and (kind is float or float(value).is_integer()) and lo <= value <= hi)
        if not ok:
            raise ApiError(400, f"Invalid value for 'hyperparameters.{name}': expected 'auto' or a number in "
                             f"[{lo}, {hi}].", param=f"hyperparameters.{name}", code="invalid_value")
        out[name] = value if value == "auto" else kind(value)
    return out


def recipe_for(base: TrainConfig, hp: dict[str, Any], seed: int) -> TrainConfig:
    """The server's recipe with the job's hyperparameters mapped on ("auto" keeps the recipe's value)."""
    update: dict[str, Any] = {"seeds": [seed]}
    if hp["n_epochs"] != "auto":
        update["epochs"] = hp["n_epochs"]
    if hp["batch_size"] != "auto":
        update["batch_size"] = hp["batch_size"]
    if hp["learning_rate_multiplier"] != "auto":
        update["lr"] = base.lr * hp["learning_rate_multiplier"]
    return TrainConfig.model_validate({**base.model_dump(), **update})


class JobStore:
    """Fine-tuning jobs under `root/jobs`, trained one at a time by a worker thread."""

    def __init__(self, root: Path, pool: Any, files: FileStore, recipe: TrainConfig | None = None):
        self.root, self.pool, self.files = root, pool, files
        self.recipe = recipe or TrainConfig()
        self.dir = root / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.todo: queue.Queue[str] = queue.Queue()
        self._load()
        threading.Thread(target=self._work, name="sublab-fine-tuning", daemon=True).start()

    def _load(self) -> None:
        """Jobs of an earlier run of the server: finished ones listed (succeeded ones served), unfinished
        ones queued again (the trainer resumes from its checkpoint)."""
        for obj in sorted((read_json(p) for p in self.dir.glob("*.json")), key=lambda o: o["created_at"]):
            job = Job(obj, read_jsonl(self.dir / f"{obj['id']}.events.jsonl", missing_ok=True))
            self.jobs[obj["id"]] = job
            if obj["status"] == "succeeded":
                self.pool.add(obj["fine_tuned_model"], str(self.root / "models" / obj["id"]))
            elif obj["status"] not in TERMINAL:
                self._set(job, status="queued")
                self._event(job, "Job queued again after a server restart.")
                self.todo.put(obj["id"])

    # -- requests ------------------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a job request, store the job as queued and hand it to the worker."""
        model, training_file = body.get("model"), body.get("training_file")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "Missing required parameter: 'model'.", param="model",
                             code="missing_required_parameter")
        if not isinstance(training_file, str) or not training_file:
            raise ApiError(400, "Missing required parameter: 'training_file'.", param="training_file",
                             code="missing_required_parameter")
        self.pool.check(model)
        if model.startswith("ft:"):
            raise ApiError(400, f"Fine-tuning a fine-tuned model ({model}) is not supported by sublab serve.",
                             param="model", code="invalid_value")
        if training_file not in self.files.objects:
            raise ApiError(400, f"Invalid file ID '{training_file}': no such file.", param="training_file",
                             code="invalid_value")
        self._check_rows(training_file)
        if body.get("validation_file"):
            raise ApiError(400, "'validation_file' is not supported by sublab serve.", param="validation_file",
                             code="unsupported_parameter")
        suffix, seed = body.get("suffix"), body.get("seed")
        if suffix is not None and not (isinstance(suffix, str) and SUFFIX.fullmatch(suffix)):
            raise ApiError(400, "'suffix' must be 1-40 letters, digits, '-' or '_'.", param="suffix",
                             code="invalid_value")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            raise ApiError(400, "'seed' must be an integer in [0, 2^31).", param="seed", code="invalid_value")
        job_id = f"ftjob-{secrets.token_hex(12)}"
        obj = {"id": job_id, "object": "fine_tuning.job", "model": model, "created_at": int(time.time()),
               "finished_at": None, "fine_tuned_model": None, "organization_id": "sublab", "result_files": [],
               "status": "queued", "validation_file": None, "training_file": training_file,
               "hyperparameters": parse_hyperparameters(body), "trained_tokens": None, "error": None,
               "seed": seed if seed is not None else secrets.randbelow(2**31), "suffix": suffix,
               "estimated_finish": None, "integrations": [], "metadata": body.get("metadata"),
               "method": {"type": "supervised"}}
        job = Job(obj)
        with self.lock:
            self.jobs[job_id] = job
        self._set(job)
        self._event(job, f"Created fine-tuning job: {job_id}")
        self.todo.put(job_id)
        return dict(obj)

    def _check_rows(self, file_id: str) -> None:
        from sublab.train import load_dataset

        try:
            load_dataset(self.files.path(file_id))
        except SublabError as e:
            raise ApiError(400, f"The training file {file_id} is not valid: {e}", param="training_file",
                             code="invalid_training_file") from None

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"Could not find fine-tune: {job_id}", param="fine_tune_id",
                             code="fine_tune_not_found")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job at once; a running one stops at its next optimizer step."""
        job = self.get(job_id)
        with self.lock:
            if job.obj["status"] in TERMINAL:
                raise ApiError(400, f"Job {job_id} has already {job.obj['status']}; it cannot be cancelled.",
                                 param="fine_tune_id", code="invalid_state")
            job.cancel.set()
            if job.obj["status"] == "queued":
                self._finish(job, "cancelled")
        return dict(job.obj)

    def page(self, items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
        """A list page of `items` (given oldest first), newest first, starting after the item `after`
        (the API's cursor)."""
        items = list(reversed(items))
        if after:
            ids = [o["id"] for o in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self.jobs[self.todo.get()]
            try:
                self._train(job)
            except Exception:  # a bug must not stop the worker; the job records it
                log.exception("fine-tuning job %s failed", job.obj["id"])
                self._finish(job, "failed", error="The trainer raised an unexpected error (see the server log).")

    def _train(self, job: Job) -> None:
        from sublab.train import train_student

        with self.pool.lock:  # one model at work at a time: training and serving share the CPU (or GPU)
            if job.cancel.is_set():
                return
            obj = job.obj
            cfg = recipe_for(self.recipe, obj["hyperparameters"], obj["seed"])
            self._set(job, status="running")
            self._event(job, f"Fine-tuning job started: {cfg.params} {cfg.loss}, {cfg.epochs} epochs, batch "
                             f"size {cfg.batch_size}, lr {cfg.lr:g}")

            def on_step(row: dict[str, Any]) -> None:
                self._event(job, f"Step {row['step']}/{row['total_steps']}: training loss={row['loss']:.4f}",
                            kind="metrics", data={"step": row["step"], "total_steps": row["total_steps"],
                                                  "train_loss": row["loss"], "tokens": row["tokens"]})
                if job.cancel.is_set():
                    raise JobCancelled

            out_dir = self.root / "models" / obj["id"]
            try:
                manifest = train_student(cfg, base_ref=self.pool.refs[obj["model"]], dataset=self.files.path(
                    obj["training_file"]), out_dir=out_dir, seed=obj["seed"], device=self.pool.device,
                    progress=False, on_step=on_step)
            except JobCancelled:
                self._finish(job, "cancelled")
                return
            except SublabError as e:
                self._finish(job, "failed", error=str(e))
                return
        model_id = f"ft:{obj['model']}:sublab:{obj['suffix'] or ''}:{obj['id'].removeprefix('ftjob-')[:8]}"
        self.pool.add(model_id, str(out_dir))
        self._finish(job, "succeeded", fine_tuned_model=model_id, trained_tokens=manifest["outputs"]["tokens"])

    # -- state ------------------------------------------------------------------------------------------

    def _finish(self, job: Job, status: str, error: str | None = None, **fields: Any) -> None:
        err = {"code": "job_failed", "message": error, "param": None} if error else None
        # The closing event before the status: a client that sees the job finished finds its event.
        self._event(job, {"succeeded": f"The job has successfully completed: {fields.get('fine_tuned_model')}",
                          "cancelled": "The job was cancelled.", "failed": f"The job failed: {error}"}[status],
                    level="error" if status == "failed" else "info")
        self._set(job, status=status, finished_at=int(time.time()), error=err, **fields)

    def _set(self, job: Job, **fields: Any) -> None:
        job.obj.update(fields)
        atomic_write_json(self.dir / f"{job.obj['id']}.json", job.obj)

    def _event(self, job: Job, message: str, *, kind: str = "message", level: str = "info",
               data: dict[str, Any] | None = None) -> None:
        event = {"id": f"ftevent-{secrets.token_hex(12)}", "object": "fine_tuning.job.event",
                 "created_at": int(time.time()), "level": level, "message": message, "data": data or {},
                 "type": kind}
        with JsonlAppender(self.dir / f"{job.obj['id']}.events.jsonl") as sink:
            sink.write_batch([event])
        job.events.append(event)
