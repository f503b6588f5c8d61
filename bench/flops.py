"""This machine's sustained torch.mm rate: the limit the benchmarks compare stage throughput with.

    from flops import matmul_flops   # inside bench/ scripts (bench/ is on sys.path when run as a script)
"""

from __future__ import annotations

import time

import torch


def matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of a square torch.mm at the current torch thread count."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size ** 3 * n / (time.perf_counter() - t0)
