"""This machine's sustained torch.mm rate: the limit the benchmarks compare stage throughput with.

    from flops import matmul_flops   # inside bench/ scripts (bench/ is on sys.path when run as a script)
"""

from __future__ import annotations

import time

import torch


def mm_seconds(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """Seconds per torch.mm(a, b), sustained over `seconds` after a warm-up call."""
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return (time.perf_counter() - t0) / n


def matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of a square torch.mm at the current torch thread count."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size ** 3 / mm_seconds(a, b, seconds)
