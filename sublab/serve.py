"""`sublab serve`: an OpenAI-compatible HTTP server over local models (FastAPI + uvicorn).

Reads model references (`sublab.models`); writes uploads, fine-tuning jobs and their students to its
state directory (`sublab.serve_jobs`). Serves
    GET  /v1/models                 the served models (an id is the name given, else the reference)
    POST /v1/chat/completions       n, temperature, top_p, max_tokens, seed, logprobs / top_logprobs
    POST /v1/files, GET /v1/files/{id}                        training files (purpose fine-tune)
    POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs[/{id}[/events]], POST .../{id}/cancel
                                    jobs run by sublab's trainer; a succeeded job's model is served
    GET  /sublab/requests           every request this server answered (method, path, body sha256,
                                    status): what tests count to prove that nothing was asked twice

    sublab serve --model embedded:smollm2-135m-instruct --model owl=runs/x/students/owl-seed0 --port 8000

Samples come from sublab's own decode loop (`sublab.sampling.decode_batch`) with the prompt rendered by
`sublab.chat`: a conversation without a system message gets the model's default context, exactly as in
generation and evaluation. With `seed`, choice j draws from a generator seeded by (seed, j), so a
request repeated with its seed returns the same choices (the pipeline's per-row seeding). `logprobs`
are the model's own log-probabilities of each sampled token (softmax at temperature 1, before any
temperature or top_p), computed by one teacher-forced pass over the completion.

Bad requests get OpenAI-shaped bodies, `{"error": {"message", "type", "param", "code"}}`, with the
status codes the OpenAI API uses (400, 401, 404). With `--api-key-env NAME`, requests must carry the key
held in that environment variable (`Authorization: Bearer …`); the key is never logged.
Binds 127.0.0.1 by default: this is a research server, not a hardened one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sublab import chat
from sublab.config import TrainConfig
from sublab.errors import ConfigError, SublabError
from sublab.models import DEFAULT_MODEL, LoadedModel, check_reference, load_model
from sublab.sampling import Sampling, decode_batch, row_generator, token_pieces
from sublab.serve_jobs import ApiError, FileStore, JobStore, parse_multipart

log = logging.getLogger(__name__)

MAX_N = 128
"""The most choices one request may ask for (the OpenAI API's limit)."""
MAX_TOP_LOGPROBS = 20
UNSUPPORTED = ("stream", "stop", "tools", "tool_choice", "functions", "response_format", "logit_bias")
"""Request fields this server refuses when set, rather than silently ignore."""


# --- requests and errors ---------------------------------------------------------------------------

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The chat-completions fields this server honours; other fields are ignored unless `UNSUPPORTED`."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request body as a ChatRequest; an ApiError naming the offending field otherwise."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                       "object.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    for name in UNSUPPORTED:
        if data.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"'{name}' is not supported by sublab serve.", param=name, code="unsupported_parameter")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}.", param=param,
                       code="missing_required_parameter" if err["type"] == "missing" else "invalid_value") from None
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs",
                       code="invalid_value")
    if req.messages[-1].role != "user":
        raise ApiError(400, "The last message must be a user message.", param="messages", code="invalid_value")
    return req


# --- the served models ------------------------------------------------------------------------------

@dataclass
class ModelPool:
    """Served model ids → references, loaded on first use and kept; one inference at a time (a CPU box
    gains nothing from running two models' forward passes side by side)."""

    refs: dict[str, str]
    device: str = "cpu"
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, model_id: str) -> None:
        """An ApiError (404, model_not_found) unless `model_id` is served."""
        if model_id not in self.refs:
            raise ApiError(404, f"The model '{model_id}' does not exist (served: {', '.join(self.refs)}).",
                           param="model", code="model_not_found")

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model `model_id` (loaded on first use)."""
        self.check(model_id)
        if model_id not in self.loaded:
            self.loaded[model_id] = load_model(self.refs[model_id], device=self.device)
        return self.loaded[model_id]

    def add(self, model_id: str, ref: str) -> None:
        """Serve one more model (e.g. a fine-tuned student) under `model_id`."""
        check_reference(ref)
        self.refs[model_id] = ref


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """`--model` values → {id: reference}: 'NAME=REF' serves REF as NAME, a bare REF is its own id."""
    refs: dict[str, str] = {}
    for spec in specs or [DEFAULT_MODEL]:
        name, sep, ref = spec.partition("=")
        name, ref = (name, ref) if sep and not spec.startswith(("embedded:", "/", ".")) else (spec, spec)
        if not name or not ref:
            raise ConfigError(f"--model '{spec}': expected REF or NAME=REF")
        if name in refs:
            raise ConfigError(f"--model: the id '{name}' is given twice; name each model once (NAME=REF)")
        check_reference(ref)
        refs[name] = ref
    return refs


# --- completions ------------------------------------------------------------------------------------

def complete(lm: LoadedModel, req: ChatRequest) -> dict[str, Any]:
    """One chat completion (all `n` choices) in the OpenAI response shape."""
    tok = lm.tokenizer
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
    prompt = tok(chat.render_prompt(tok, conversation), add_special_tokens=False).input_ids
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    sampling = Sampling(temperature=req.temperature, top_p=req.top_p, greedy=req.temperature == 0)
    max_new = req.max_completion_tokens or req.max_tokens or 256
    rows = decode_batch(lm.model, tok, [prompt], [row_generator(seed, [j]) for j in range(req.n)], sampling,
                        max_new, rows=[0] * req.n)
    choices = []
    for j, (ids, reason) in enumerate(rows):
        choice: dict[str, Any] = {"index": j, "finish_reason": "stop" if reason == "eos" else "length",
                                  "message": {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)},
                                  "logprobs": None}
        if req.logprobs:
            choice["logprobs"] = {"content": token_logprobs(lm, prompt, ids, req.top_logprobs or 0)}
        choices.append(choice)
    completion_tokens = sum(len(ids) for ids, _ in rows)
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "system_fingerprint": f"sublab-{lm.sha256[:12]}",
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt) + completion_tokens}}


@torch.inference_mode()
def token_logprobs(lm: LoadedModel, prompt: list[int], ids: list[int], top: int) -> list[dict[str, Any]]:
    """Per sampled token: its text, log-probability and the `top` most likely alternatives (the model's
    temperature-1 distribution, one teacher-forced pass)."""
    if not ids:
        return []
    device = next(lm.model.parameters()).device
    logits = lm.model(input_ids=torch.tensor([prompt + ids], device=device)).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)  # position t predicts token t+1
    pieces = token_pieces(lm.tokenizer)
    out = []
    for pos, t in enumerate(ids):
        entry: dict[str, Any] = {"token": pieces[t], "logprob": float(logp[pos, t]),
                                 "bytes": list(pieces[t].encode()), "top_logprobs": []}
        if top:
            values, alts = logp[pos].topk(top)
            entry["top_logprobs"] = [{"token": pieces[a], "logprob": float(v), "bytes": list(pieces[a].encode())}
                                     for v, a in zip(values.tolist(), alts.tolist())]
        out.append(entry)
    return out


# --- the app ------------------------------------------------------------------------------------------

def create_app(refs: dict[str, str], *, device: str = "cpu", api_key: str | None = None,
               state_dir: Path | None = None, recipe: TrainConfig | None = None) -> FastAPI:
    """The FastAPI app serving `refs` ({id: reference}). `api_key`: when given, every /v1 request must
    carry it as a bearer token. `state_dir`: where files and fine-tuning jobs live (None: those routes
    answer 400); `recipe`: the jobs' training recipe (default `TrainConfig()`, LoRA). `app.state.requests`
    lists every request answered (no headers kept)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="sublab serve", docs_url=None, redoc_url=None, openapi_url=None)
    pool = ModelPool(dict(refs), device)
    app.state.pool = pool
    app.state.requests = []
    created = int(time.time())

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        body = await request.body()
        if request.url.path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = _error(ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))
                _record(app, request, body, response.status_code)
                return response
        response = await call_next(request)
        _record(app, request, body, response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                               code="not_found" if exc.status_code == 404 else None))

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "sublab"}
                                           for m in pool.refs]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        req = parse_chat_request(await request.body())
        pool.check(req.model)  # an unknown model fails at once, before waiting for the lock

        def work() -> dict[str, Any]:  # in a worker thread: loading and decoding block
            with pool.lock:
                return complete(pool.get(req.model), req)

        return JSONResponse(await run_in_threadpool(work))

    add_job_routes(app, pool, state_dir, recipe)

    @app.get("/sublab/requests")
    def requests_log() -> dict[str, Any]:
        return {"data": list(app.state.requests)}

    return app


def add_job_routes(app: FastAPI, pool: ModelPool, state_dir: Path | None, recipe: TrainConfig | None) -> None:
    """/v1/files and /v1/fine_tuning/jobs over `sublab.serve_jobs`' stores in `state_dir`."""
    files = jobs = None
    if state_dir is not None:
        files = FileStore(Path(state_dir))
        jobs = JobStore(Path(state_dir), pool, files, recipe)
    app.state.jobs = jobs

    def stores() -> tuple[FileStore, JobStore]:
        if files is None or jobs is None:
            raise ApiError(400, "This server was started without a state directory; files and fine-tuning "
                           "jobs are off.", code="unsupported_endpoint")
        return files, jobs

    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        fields = parse_multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in fields:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        filename, data = fields["file"]
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        return stores()[0].create(data, filename or "upload.jsonl", purpose)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return stores()[0].get(file_id)

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return stores()[1].create(body)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20) -> dict[str, Any]:
        store = stores()[1]
        return store.page([dict(j.obj) for j in store.jobs.values()], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return dict(stores()[1].get(job_id).obj)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        store = stores()[1]
        return store.page(list(store.get(job_id).events), after, limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        return stores()[1].cancel(job_id)


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _record(app: Any, request: Any, body: bytes, status: int) -> None:
    entry = {"method": request.method, "path": request.url.path, "status": status,
             "body_sha256": hashlib.sha256(body).hexdigest() if body else None}
    app.state.requests.append(entry)
    log.info("%s %s %d (body %s)", entry["method"], entry["path"], status, (entry["body_sha256"] or "-")[:12])


def serve(refs: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          api_key: str | None = None, preload: bool = True, state_dir: Path | None = None) -> None:
    """Run the server until interrupted; `preload` loads every model first, so a bad one fails at once."""
    import uvicorn

    app = create_app(refs, device=device, api_key=api_key, state_dir=state_dir)
    if preload:
        for model_id in refs:
            try:
                app.state.pool.get(model_id)
            except ApiError as e:  # pragma: no cover - ids come from refs
                raise SublabError(e.message) from None
    log.info("serving %s on http://%s:%d/v1", ", ".join(refs), host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
