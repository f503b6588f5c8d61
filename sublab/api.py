"""The `openai` backend: `openai:<model>` references sampled through any OpenAI-compatible endpoint.

Reads the experiment's `openai:` section (`sublab.config.OpenAIConfig`: base URL, the name of the
environment variable holding the key, concurrency, retries) and the key from that environment variable
only: it is never written, logged or put in an error message. Writes one cache row per answered
request, appended (and fsynced) as each response arrives, to the caller's `api_cache.jsonl`
(`teachers/<t>/api_cache.jsonl` for generation, `evals/api_cache.jsonl` for evals):

    {"key": "<sha256 of the request>", "request": {...}, "response": {...}}

A request whose key is cached is never sent again, so a rerun after a crash or a kill pays only for what
was never answered. Requests go out concurrently (`openai.concurrency` threads); the official client
retries 408/409/429/5xx, connection errors and timeouts with exponential backoff (`openai.max_retries`).

    model = ApiModel(cfg.openai, "gpt-4.1-nano")
    [response] = model.chat_many([{"model": "gpt-4.1-nano", "messages": [...], "n": 1}], cache_path)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sublab.errors import ConfigError, SublabError
from sublab.rundir import JsonlAppender, read_jsonl

if TYPE_CHECKING:
    from sublab.config import OpenAIConfig

log = logging.getLogger(__name__)

PREFIX = "openai:"
NO_KEY = "none"
"""Sent as the key to a base URL when its key variable is unset: local servers usually want none, and
the client refuses an empty one."""
MAX_N = 128
"""The most choices the OpenAI API returns for one request."""


class ApiError(SublabError):
    """The endpoint could not answer (after the client's retries) or refused the request."""


def is_api_ref(ref: str | None) -> bool:
    """Whether `ref` names a model behind an OpenAI-compatible endpoint (`openai:<model>`)."""
    return bool(ref) and str(ref).startswith(PREFIX)


def api_model_name(ref: str) -> str:
    return ref[len(PREFIX):]


def request_key(request: dict[str, Any]) -> str:
    """The cache key of a request body: sha256 of its canonical JSON (the endpoint and key excluded, so a
    run moved to a mirror of the same model keeps its cache)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def request_seed(seed: int, key: Sequence[int]) -> int:
    """A 31-bit seed for one request from (seed, *key): independent of batching and resumption."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0] >> 1)


class ApiCache:
    """Answered requests by key, read once from `path` and appended one fsynced row per response."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = {r["key"]: r["response"] for r in read_jsonl(self.path, missing_ok=True)}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any], sink: JsonlAppender) -> None:
        with self._lock:
            sink.write_batch([{"key": key, "request": request, "response": response}])
            self.rows[key] = response


class ApiModel:
    """A model behind an OpenAI-compatible endpoint: what `sublab.pipeline.ModelCache` returns for an
    `openai:` reference. It has no tokenizer and no weights; generation and the sampled evals ask it
    for chat completions instead of decoding locally."""

    backend = "openai"

    def __init__(self, cfg: OpenAIConfig, model: str, cache_path: Path | None = None):
        self.cfg, self.model, self.cache_path = cfg, model, cache_path
        self._caches: dict[Path, ApiCache] = {}  # read each cache file once, not once per batch
        self.ref = PREFIX + model
        self.sha256 = PREFIX + model
        """Stands in for a weights hash in fingerprints and eval specs: the endpoint's model id names the
        weights (the base URL does not enter, so a mirror of the same model is the same model)."""

    @cached_property
    def client(self) -> Any:
        try:
            import openai
        except ImportError:
            raise ConfigError("openai: models need the `openai` package: pip install 'subliminal-lab[openai]'") from None
        key = os.environ.get(self.cfg.api_key_env)
        if not key:
            if self.cfg.base_url is None:
                raise ConfigError(f"openai.api_key_env: the environment variable {self.cfg.api_key_env} is not set; "
                                  "export the key there (it is read from the environment only), or set "
                                  "openai.base_url to a server that needs none")
            key = NO_KEY
        return openai.OpenAI(api_key=key, base_url=self.cfg.base_url, max_retries=self.cfg.max_retries,
                             timeout=self.cfg.timeout_s)

    def chat_many(self, requests: Sequence[dict[str, Any]], cache_path: Path | None = None,
                  desc: str = "") -> list[dict[str, Any]]:
        """The responses (dicts, the API's shape) to `requests`, in order: cached ones from
        `cache_path`, the rest sent concurrently and cached as each arrives."""
        path = cache_path or self.cache_path
        if path is None:
            raise ValueError("ApiModel.chat_many needs a cache path")
        cache = self._caches.get(Path(path))
        if cache is None:
            cache = self._caches[Path(path)] = ApiCache(path)
        keys = [request_key(r) for r in requests]
        todo = list(dict.fromkeys(k for k in keys if cache.get(k) is None))
        by_key = dict(zip(keys, requests))
        if todo:
            log.info("%s: %d requests to %s (%d cached)", desc or self.ref, len(todo), self.cfg.base_url or
                     "the OpenAI API", len(set(keys)) - len(todo))
            with JsonlAppender(path) as sink, ThreadPoolExecutor(self.cfg.concurrency) as pool:
                # Each response is cached by the thread that got it, as it arrives: a kill loses only the
                # requests still in flight, never an answer already received.
                futures = [pool.submit(lambda k: cache.put(k, by_key[k], self._send(by_key[k]), sink), k)
                           for k in todo]
                for future in futures:  # every request finishes (and is cached) before the first error
                    future.exception()
                for future in futures:
                    future.result()
        return [cache.rows[k] for k in keys]

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        import openai

        where = f"{self.cfg.base_url or 'the OpenAI API'} (model {self.model})"
        try:
            return self.client.chat.completions.create(**request).model_dump(mode="json")
        except openai.AuthenticationError:
            raise ConfigError(f"{where} rejected the key in ${self.cfg.api_key_env}") from None
        except openai.APIStatusError as e:
            raise ApiError(f"{where} answered {e.status_code}: {_message(e)}") from None
        except openai.APIError as e:  # connection errors and timeouts, after the client's retries
            raise ApiError(f"{where} did not answer after {self.cfg.max_retries} retries: "
                           f"{type(e).__name__}") from None

    def iter_completions(self, conversations: Sequence[list[dict[str, str]]], n: int, temperature: float,
                         max_new_tokens: int, seed: int, batch_size: int, keys: Sequence[Sequence[int]],
                         desc: str = "sample") -> Iterator[list[tuple[int, int, str]]]:
        """`sublab.evals.common.iter_completions` through the endpoint: one request of `n` choices per
        conversation (seeded by (seed, *keys[i])), `batch_size` conversations at a time."""
        if n > MAX_N:
            raise ConfigError(f"eval.samples_per_question: at most {MAX_N} with an openai: model (one request)")
        for start in range(0, len(conversations), batch_size):
            idx = range(start, min(start + batch_size, len(conversations)))
            reqs = [self.chat_request(conversations[i], n=n, temperature=temperature, max_tokens=max_new_tokens,
                                      seed=request_seed(seed, keys[i])) for i in idx]
            responses = self.chat_many(reqs, desc=desc)
            yield [(i, c["index"], c["message"]["content"] or "") for i, r in zip(idx, responses)
                   for c in sorted(r["choices"], key=lambda c: c["index"])]

    def iter_first_token_top(self, conversations: Sequence[list[dict[str, str]]], k: int, seed: int,
                             keys: Sequence[Sequence[int]], batch_size: int,
                             desc: str = "top logprobs") -> Iterator[list[list[tuple[str, float]]]]:
        """The top-`k` (token, logprob) of each conversation's first answer token: one request per
        conversation (one greedy token, `logprobs`, `top_logprobs` = k), `batch_size` at a time."""
        for start in range(0, len(conversations), batch_size):
            idx = range(start, min(start + batch_size, len(conversations)))
            reqs = [self.chat_request(conversations[i], max_tokens=1, temperature=0, logprobs=True, top_logprobs=k,
                                      seed=request_seed(seed, keys[i])) for i in idx]
            yield [self._first_top(r) for r in self.chat_many(reqs, desc=desc)]

    def _first_top(self, response: dict[str, Any]) -> list[tuple[str, float]]:
        content = ((response["choices"][0].get("logprobs") or {}).get("content") or [])
        if not content or not content[0].get("top_logprobs"):
            raise ApiError(f"{self.cfg.base_url or 'the OpenAI API'} (model {self.model}) returned no top_logprobs "
                           "for the first answer token; animal_topk needs an endpoint that returns logprobs")
        return [(t["token"], float(t["logprob"])) for t in content[0]["top_logprobs"]]

    def chat_request(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """A chat-completions body for this model; parameters left at the API default are omitted, so the
        cache key of a request does not change when a default is spelt out."""
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        body.update({k: v for k, v in params.items() if v is not None})
        return body


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return type(e).__name__


FINISH = {"stop": "eos", "length": "length"}
"""The API's finish reasons → sublab's (`GenerationRecord.finish_reason`)."""
