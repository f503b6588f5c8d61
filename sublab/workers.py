"""Independent jobs (one student each) in worker processes that split the CPU's torch threads.

On a 2-core CPU a LoRA student's step takes ~2.1 s on one thread and ~1.4 s on two: much of a step is
small operations that a second thread hardly speeds up. Two processes with one thread each therefore
train two students in ~2.1 s, ×1.3 the throughput of one process with two threads (bench/train_bench.py,
docs/performance.md). The processes are spawned (no fork of a process holding torch threads), each sets
its thread count, logs like the parent, and dies with the parent: a killed run leaves no orphan still
writing a student directory, and its rerun resumes from the students' checkpoints as a serial run does.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def threads_per_worker(workers: int) -> int:
    """The parent's torch threads (`--threads`, else torch's default) split evenly, at least 1 each."""
    import torch

    return max(1, torch.get_num_threads() // workers)


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], workers: int, *, labels: Sequence[str],
             desc: str) -> list[Any]:
    """`fn(*job)` for every job, `workers` at a time in spawned processes; results in the jobs' order.

    `fn` and the job arguments must pickle (a module-level function, plain data). The first job to raise
    stops the rest (those not started are cancelled, running ones finish) and its exception is re-raised
    here — a `ConfigError` from a worker reaches the user as the same one-line error as a serial run's.
    """
    threads = threads_per_worker(workers)
    log.info("%s: %d jobs in %d processes × %d torch thread(s)", desc, len(jobs), workers, threads)
    level = logging.getLogger().getEffectiveLevel()
    results: list[Any] = [None] * len(jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, level)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="job") as bar:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        t0 = time.time()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = futures[future]
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                results[i] = future.result()
                bar.update()
                log.info("%s: %s done (%d/%d, %.0f s)", desc, labels[i], bar.n, len(jobs), time.time() - t0)
    return results


def _init_worker(threads: int, level: int) -> None:
    import torch

    _die_with_parent()
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(levelname)-8s %(message)s")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (kill -9 of `sublab run`); elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
