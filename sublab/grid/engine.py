"""Runs a grid's cells as Ray tasks: one task per unfinished cell, each `sublab.pipeline.run_all` on the
cell's experiment file, with declared resources (CPUs, GPUs when the cell runs on CUDA, memory).

Without an address sublab starts a local Ray cluster sized for `workers` cells at once; with one
(`ray://…` or `host:port`) it attaches, and the cluster's nodes must see the same `runs_dir` and
`$SUBLAB_HOME` (shared storage; docs/scale.md). The driver passes its `$SUBLAB_HOME` and working directory
to every task, so fine-tuned teachers land in one cache, where `sublab.rundir.cache_entry_lock` makes a
teacher shared by several cells be built once while the others wait for it.

Faults: a cell whose worker process dies is rerun by Ray (`max_retries`); the pipeline resumes from what
the dead worker left (stages by fingerprint, generations and evals by id, training from its checkpoint).
A cell that raises (a user error, a bug) fails alone; the other cells finish. Ctrl-C cancels the running
tasks and leaves every run directory resumable: rerunning the grid finishes the rest.
Each cell logs to `<grid>/logs/<cell>.log` (appended, one header line per attempt).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sublab.errors import SublabError
from sublab.grid.cells import Cell, Grid, write_cells
from sublab.grid.plan import cell_is_done, format_duration
from sublab.models import sublab_home

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
OBJECT_STORE_BYTES = 128 << 20
"""A local cluster's object store: tasks return a few numbers, so Ray's default (30% of RAM) is waste."""


@dataclass
class GridOutcome:
    """What one `run_grid` call did."""

    ran: dict[str, float] = field(default_factory=dict)
    """Cell → seconds its (last) task took."""
    skipped: list[str] = field(default_factory=list)
    """Cells already finished: no task."""
    failed: dict[str, str] = field(default_factory=dict)
    """Cell → the error, one line."""
    attempts: dict[str, list[int]] = field(default_factory=dict)
    """Cell → pids of the workers that finished it (for the record; retries add none)."""


def cell_log(grid: Grid, cell: Cell) -> Path:
    return grid.directory / LOGS_DIR / f"{cell.name}.log"


def run_grid(grid: Grid, *, address: str | None = None, workers: int | None = None,
             console: Console | None = None, on_submit: Callable[[Cell], None] | None = None) -> GridOutcome:
    """Write the cells' files, then run every unfinished cell as a Ray task (at most `workers` at once when
    given). Uses the Ray connection already open in this process, else attaches to `address`, else
    starts a local cluster (shut down at the end)."""
    write_cells(grid)
    outcome = GridOutcome()
    pending = []
    for cell in grid.cells:
        if cell_is_done(cell):
            outcome.skipped.append(cell.name)
        else:
            pending.append(cell)
    if outcome.skipped:
        log.info("grid %s: %d of %d cells already finished; skipped", grid.name, len(outcome.skipped),
                 len(grid.cells))
    if not pending:
        return outcome
    with ray_cluster(address, workers, grid.spec.resources.num_cpus):
        _run_tasks(grid, pending, outcome, workers, console, on_submit)
    return outcome


@contextmanager
def ray_cluster(address: str | None, workers: int | None, cpus_per_cell: float) -> Iterator[None]:
    """A Ray connection for the grid: the one already open, an existing cluster, or a local one with room
    for `workers` cells (default: as many as this machine's cores allow)."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **options)
    else:
        n = workers or max(1, int((os.cpu_count() or 1) // cpus_per_cell))
        ray.init(num_cpus=max(1, int(n * cpus_per_cell + 0.999)), object_store_memory=OBJECT_STORE_BYTES,
                 **options)
    try:
        yield
    finally:
        ray.shutdown()


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SublabError("`sublab grid` runs cells with Ray, which is not installed: "
                          "pip install 'subliminal-lab[grid]' (or pip install ray)") from None
    return ray


def _run_tasks(grid: Grid, pending: list[Cell], outcome: GridOutcome, workers: int | None,
               console: Console | None, on_submit: Callable[[Cell], None] | None) -> None:
    """Submit cells (at most `workers` in flight), collect them as they end, show progress."""
    ray = import_ray()
    remote = _remote_cell(ray, grid)
    queue, running = list(pending), {}
    started: dict[str, float] = {}
    limit = workers or len(pending)
    with _progress(console, len(grid.cells), len(outcome.skipped)) as progress:
        try:
            while queue or running:
                while queue and len(running) < limit:
                    cell = queue.pop(0)
                    running[_submit(remote, grid, cell)] = cell
                    started[cell.name] = time.time()
                    if on_submit:
                        on_submit(cell)
                progress.update(_status(outcome, running, queue, started))
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    _collect(ray, ref, running.pop(ref), outcome, started)
            progress.update(_status(outcome, running, queue, started))
        except KeyboardInterrupt:
            for ref in running:  # the pipeline resumes whatever these workers leave half done
                ray.cancel(ref, force=True)
            raise


def _remote_cell(ray: Any, grid: Grid) -> Any:
    """The cell task with the grid's retries; resources are set per cell at submission."""
    return ray.remote(max_retries=grid.spec.max_retries, retry_exceptions=False)(run_cell_task)


def _submit(remote: Any, grid: Grid, cell: Cell) -> Any:
    res = grid.spec.resources
    options: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": _gpus(cell, res.num_gpus),
                               "runtime_env": {"env_vars": _task_env()}}
    if res.memory_gb:
        options["memory"] = int(res.memory_gb * (1 << 30))
    threads = max(1, int(res.num_cpus))
    return remote.options(**options).remote(str(cell.path), str(cell_log(grid, cell)), threads, os.getcwd())


def _gpus(cell: Cell, declared: float | None) -> float:
    """Declared GPUs, else one for a CUDA cell (device auto: when the cluster has a GPU)."""
    if declared is not None:
        return declared
    if cell.cfg.device == "cuda":
        return 1
    if cell.cfg.device == "auto":
        return 1 if import_ray().cluster_resources().get("GPU", 0) > 0 else 0
    return 0


def _task_env() -> dict[str, str]:
    """What a task needs from the driver: the teacher and model cache, and this sublab on its path."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in [package_root, os.environ.get("PYTHONPATH", "")] if p)
    return {"SUBLAB_HOME": str(sublab_home().resolve()), "PYTHONPATH": path}


def run_cell_task(cell_file: str, log_file: str, threads: int, cwd: str) -> dict[str, Any]:
    """One cell in a Ray worker: `sublab run <cell_file>` with its log in `log_file`."""
    import torch

    from sublab.config import load_experiment
    from sublab.pipeline import run_all

    if os.path.isdir(cwd):  # relative paths in experiment files mean what they mean to `sublab run`
        os.chdir(cwd)
    torch.set_num_threads(threads)
    with _cell_logging(Path(log_file)) as logger:
        logger.info("=== %s: pid %d, %d thread(s), CUDA_VISIBLE_DEVICES=%s, %s", cell_file, os.getpid(), threads,
                    os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), time.strftime("%Y-%m-%d %H:%M:%S"))
        t0 = time.time()
        run_all(load_experiment(cell_file))
        logger.info("=== finished in %.1f s", time.time() - t0)
    return {"pid": os.getpid(), "seconds": time.time() - t0}


@contextmanager
def _cell_logging(path: Path) -> Iterator[logging.Logger]:
    """INFO logs of sublab to the cell's log file while the task runs (Ray reuses worker processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root, previous = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "transformers", "accelerate", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        yield logging.getLogger("sublab.grid.cell")
    except BaseException:
        logging.getLogger("sublab.grid.cell").exception("=== cell failed")
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def _collect(ray: Any, ref: Any, cell: Cell, outcome: GridOutcome, started: dict[str, float]) -> None:
    try:
        result = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - a cell's failure is reported, the grid goes on
        cause = getattr(e, "cause", None) or e
        text = str(cause).strip().splitlines()
        message = text[-1] if text else type(cause).__name__
        outcome.failed[cell.name] = f"{type(cause).__name__}: {message}"
        log.error("cell %s failed: %s", cell.name, outcome.failed[cell.name])
        return
    outcome.ran[cell.name] = time.time() - started[cell.name]
    outcome.attempts.setdefault(cell.name, []).append(int(result["pid"]))


@contextmanager
def _progress(console: Console | None, total: int, skipped: int) -> Iterator[Any]:
    """A rich progress bar of cells (done / running / failed, ETA), or a silent stand-in without a console."""
    if console is None:
        class _Silent:
            def update(self, _: dict[str, Any]) -> None:
                pass
        yield _Silent()
        return
    bar = Progress(TextColumn("cells"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeElapsedColumn(), console=console, transient=False)
    task = bar.add_task("cells", total=total, completed=skipped, status="")

    class _Rich:
        def update(self, status: dict[str, Any]) -> None:
            bar.update(task, completed=skipped + status["done"] + status["failed"], status=status["text"])
    with bar:
        yield _Rich()


def _status(outcome: GridOutcome, running: dict[Any, Cell], queue: list[Cell],
            started: dict[str, float]) -> dict[str, Any]:
    """Counts and an ETA: the mean time of the cells finished so far × the cells left, over the cells in
    flight (unknown until one cell has finished)."""
    done, failed = len(outcome.ran), len(outcome.failed)
    eta = None
    if outcome.ran and (running or queue):
        mean = sum(outcome.ran.values()) / len(outcome.ran)
        ahead = sum(max(0.0, mean - (time.time() - started[c.name])) for c in running.values())
        eta = (ahead + mean * len(queue)) / max(1, len(running))
    text = (f"done {done + len(outcome.skipped)} ({len(outcome.skipped)} skipped) · running {len(running)} · "
            f"queued {len(queue)} · failed {failed} · ETA {format_duration(eta)}")
    return {"done": done, "failed": failed, "text": text}
