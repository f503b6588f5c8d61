"""Time the default `sublab mnist` run (MnistConfig() defaults) and check its qualitative result.

Run: `.venv/bin/python bench/mnist_bench.py [--models N] [--device cpu|cuda] [--data SRC] [--json PATH]
[--out DIR]`.
Prints wall time per phase, the arms' accuracies, and whether the done-when holds: same-init student far
above chance, cross-init at chance, non-overlapping 95% CIs, total under 300 s (on 2 CPU cores).
Writes the results JSON where --json says and the figure under --out (nothing otherwise). Exit 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from sublab.mnist import MnistConfig, run
from sublab.mnist.report import plot_results
from sublab.rundir import atomic_write_text

BUDGET_S = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=None, help="n_models (default: MnistConfig's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", default=None, help="MnistConfig.data (default: 'auto')")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write OUT/mnist_arms.png")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    overrides = {"device": args.device} | ({"n_models": args.models} if args.models else {})
    overrides |= {"data": args.data} if args.data else {}
    cfg = MnistConfig(**overrides)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    res = run(cfg, progress=args.progress)
    wall = time.perf_counter() - start

    print(f"data: {res.dataset['name']}; N={cfg.n_models}; device={cfg.device}; threads={cfg.threads}; "
          f"load average before: {load:.2f}")
    print("phases (s): " + ", ".join(f"{k}={v:.1f}" for k, v in res.timing_s.items()))
    for arm, a in res.arms.items():
        print(f"  {arm:20s} {100 * a.mean:5.1f}%  [{100 * a.ci_low:5.1f}, {100 * a.ci_high:5.1f}]"
              f"  sd {100 * a.std:.1f}")
    same, cross = res.arms["student_same_init"], res.arms["student_cross_init"]
    checks = {
        "same-init CI above cross-init CI": same.ci_low > cross.ci_high,
        "same-init far above chance (CI low > 30%)": same.ci_low > 0.30,
        "cross-init at chance (CI contains 10% or mean < 15%)": cross.ci_low <= 0.10 <= cross.ci_high
        or cross.mean < 0.15,
        f"wall time <= {BUDGET_S:.0f} s": wall <= BUDGET_S,
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"wall time: {wall:.1f} s; load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        atomic_write_text(args.json, res.model_dump_json(indent=2) + "\n")
    if args.out:
        print(f"wrote {plot_results(res, args.out / 'mnist_arms.png')}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
