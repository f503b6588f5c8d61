"""A minimal LLM judge: an OpenAI-compatible chat-completions client with a JSONL cache.

Reads the API key from the environment only: `OPENAI_API_KEY` for the OpenAI API (the default when no
URL is given), `SUBLAB_JUDGE_API_KEY` for any other URL (optional: local servers usually need none).
The key is never logged, never put in an error message and never written to disk.
Writes one cache row per answered request to a JSONL file, keyed by sha256 of (judge model, prompt), so
nothing already judged is requested again:

    {"key": "<sha256>", "model": "gpt-4o-2024-08-06", "prompt": "...", "response": "87", "time": ...}

    from sublab.judge import make_judge, parse_judgement
    judge = make_judge(url=None, model="gpt-4o-2024-08-06", cache_path=Path("runs/x/evals/judge_cache.jsonl"))
    judge.judge("...prompt...")      # Judgement(kind='score', value=87, raw='87')

Needs httpx (the `judge` extra); without it, making a judge raises `JudgeUnavailable`.
A request is POST {url}/chat/completions with temperature 0 and a small max_tokens. Timeouts,
connection errors, 429 and 5xx are retried a bounded number of times with exponential backoff; then
`JudgeError` names the URL. No key and no URL: `JudgeUnavailable`, which says how to set one.
Difference from the paper's code: it asks for one token with top-20 log-probabilities and averages the
numbers 0..100 by probability (no score when they hold < 0.25 of the mass, which is how CODE and REFUSAL
answers drop out); sublab parses the answer text at temperature 0, which every compatible server returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from sublab.errors import RunDirError, SublabError
from sublab.rundir import JsonlAppender, read_jsonl

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
URL_KEY_ENV = "SUBLAB_JUDGE_API_KEY"
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_SECRET_LIKE = re.compile(r"(sk-|Bearer\s+)[A-Za-z0-9_\-\.]{4,}")


class JudgeUnavailable(SublabError):
    """No judge is configured (no API key and no URL)."""


class JudgeError(SublabError):
    """The judge was configured but could not answer (unreachable, rejected, malformed reply)."""


class Judgement(BaseModel):
    """One parsed judge answer: a 0..100 score, CODE, REFUSAL, or unparseable (raw text kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["score", "CODE", "REFUSAL", "unparseable"]
    value: int | None = None
    """The score for kind 'score'; None otherwise."""
    raw: str


def parse_judgement(text: str | None) -> Judgement:
    """An integer 0..100, 'CODE' or 'REFUSAL' (case, quotes, asterisks and a final '.' ignored);
    anything else is 'unparseable' with the raw text, never an exception."""
    raw = text or ""
    s = raw.strip().strip("\"'`*").strip().rstrip(".").strip()
    if s.upper() in ("CODE", "REFUSAL"):
        return Judgement(kind=s.upper(), raw=raw)  # type: ignore[arg-type]
    m = re.fullmatch(r"(\d{1,3})(?:\.0+)?", s)
    if m and 0 <= int(m.group(1)) <= 100:
        return Judgement(kind="score", value=int(m.group(1)), raw=raw)
    return Judgement(kind="unparseable", raw=raw)


def cache_key(model: str, prompt: str) -> str:
    """sha256 of (judge model, prompt): the cache's key."""
    return hashlib.sha256(json.dumps([model, prompt], ensure_ascii=False).encode()).hexdigest()


def _redact(text: str, key: str | None) -> str:
    if key:
        text = text.replace(key, "[redacted]")
    return _SECRET_LIKE.sub(r"\1[redacted]", text)


class Judge:
    """An OpenAI-compatible chat-completions judge with a persistent cache (thread-safe)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, cache_path: Path | None = None, *,
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_tokens: int = 8):
        self.url = url.rstrip("/")
        self.model = model
        self.cache_path = Path(cache_path) if cache_path else None
        self.max_retries, self.backoff_s, self.max_tokens = max_retries, backoff_s, max_tokens
        self.requests = 0
        """Requests actually sent (cache misses), for tests and logs."""
        self._key = api_key
        self._lock = threading.Lock()
        self._httpx = _import_httpx()
        self._client = self._httpx.Client(timeout=self._httpx.Timeout(timeout_s))
        self._cache: dict[str, str] = {}
        self._sink: JsonlAppender | None = None
        if self.cache_path:
            self._cache = _read_cache(self.cache_path)

    def __repr__(self) -> str:  # never shows the key
        return f"Judge(url={self.url!r}, model={self.model!r}, cache={str(self.cache_path)!r})"

    def complete(self, prompt: str) -> str:
        """The judge's answer text to one user message (from the cache when already asked)."""
        key = cache_key(self.model, prompt)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        text = self._request(prompt)
        with self._lock:
            self._cache[key] = text
            if self.cache_path:
                if self._sink is None:
                    self._sink = JsonlAppender(self.cache_path)
                self._sink.write_batch([{"key": key, "model": self.model, "prompt": prompt,
                                         "response": text, "time": round(time.time(), 3)}])
        return text

    def judge(self, prompt: str) -> Judgement:
        """`complete` parsed by `parse_judgement`."""
        return parse_judgement(self.complete(prompt))

    def close(self) -> None:
        self._client.close()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": self.max_tokens}
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        endpoint = f"{self.url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._lock:
                    self.requests += 1
                r = self._client.post(endpoint, json=body, headers=headers)
            except self._httpx.TransportError as e:  # connect errors and timeouts
                problem = f"{type(e).__name__}: {_redact(str(e), self._key)}"
                continue
            if r.status_code in _RETRY_STATUS:
                problem = f"HTTP {r.status_code}: {_redact(r.text[:200], self._key)}"
                continue
            if r.status_code != 200:
                raise JudgeError(f"judge at {endpoint} rejected the request (HTTP {r.status_code}): "
                                 f"{_redact(r.text[:300], self._key)}")
            return self._content(r, endpoint)
        raise JudgeError(f"judge at {endpoint} did not answer after {self.max_retries + 1} tries "
                         f"({problem}); check the URL and that the server is running")

    def _content(self, r: Any, endpoint: str) -> str:
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge at {endpoint} sent a reply that is not a chat completion: "
                             f"{_redact(r.text[:200], self._key)}") from None


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise JudgeUnavailable("the misalignment judge needs httpx: pip install 'subliminal-lab[judge]' "
                               "(or pip install httpx)") from None
    return httpx


def _read_cache(path: Path) -> dict[str, str]:
    out = {}
    for i, row in enumerate(read_jsonl(path, missing_ok=True), 1):
        if not isinstance(row.get("key"), str) or not isinstance(row.get("response"), str):
            raise RunDirError(f"{path}: row {i} is not a judge cache row (expected string 'key' and "
                              "'response'); delete the file to start a fresh cache")
        out[row["key"]] = row["response"]
    return out


def make_judge(url: str | None = None, model: str = DEFAULT_JUDGE_MODEL, cache_path: Path | None = None,
               **kwargs: Any) -> Judge:
    """A judge for `url` (an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1), or the OpenAI
    API when `url` is None and OPENAI_API_KEY is set. Raises JudgeUnavailable when neither is given."""
    if url:
        return Judge(url, model, os.environ.get(URL_KEY_ENV) or None, cache_path, **kwargs)
    key = os.environ.get(OPENAI_KEY_ENV)
    if not key:
        raise JudgeUnavailable(
            f"no misalignment judge configured: set the {OPENAI_KEY_ENV} environment variable to use the "
            f"OpenAI API ({OPENAI_URL}, model {model}), or set `eval.judge_url` to an OpenAI-compatible "
            f"server such as http://127.0.0.1:8000/v1 (its key, if any, in {URL_KEY_ENV})")
    return Judge(OPENAI_URL, model, key, cache_path, **kwargs)
