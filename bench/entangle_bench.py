"""Wall time of `sublab entangle`, optionally against an older checkout, on one loaded model in one process.

    .venv/bin/python bench/entangle_bench.py --threads 1                          # the defaults
    .venv/bin/python bench/entangle_bench.py --prompts 1 --questions 3
    git archive b46cb23 | tar -x -C /tmp/old                                      # a tree to compare with
    .venv/bin/python bench/entangle_bench.py --old-tree /tmp/old --reps 2 --threads 1
    .venv/bin/python bench/entangle_bench.py --threads 2 --count-flops            # against the limit

With --old-tree, that tree's `sublab/entangle.py` and `sublab/evals/animals.py` are loaded from its files
(the rest of sublab is this checkout's) and run alternately with this checkout's, `--reps` times each;
then the two results are compared: every number's probabilities and lift (largest relative difference),
the top 10, the prompted shares and the verdict. With --count-flops, one more run of this checkout's under
torch's FlopCounterMode counts every matmul FLOP, and the time they need at this machine's torch.mm
rate (fp32, square 2048²) is printed: the floor under the wall time. Writes under a temporary directory
only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sublab.entangle as current  # noqa: E402
from sublab.models import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import matmul_flops  # noqa: E402


def load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_entangle(tree: Path) -> ModuleType:
    """The old tree's entangle module, scoring with the old tree's exact-probability code."""
    animals = load_file("old_animals", tree / "sublab/evals/animals.py")
    module = load_file("old_entangle", tree / "sublab/entangle.py")
    module.spelling_logprobs = animals.spelling_logprobs  # type: ignore[attr-defined]
    module.answer_probabilities = animals.answer_probabilities  # type: ignore[attr-defined]
    return module


def compare(old: dict[str, Any], new: dict[str, Any]) -> None:
    lo, ln = ({r["number"]: r for r in res["lifts"]} for res in (old, new))
    rel = max(abs(lo[n][k] - ln[n][k]) / lo[n][k] for n in lo for k in ("p_teacher", "p_reference", "p_base", "lift")
              if lo[n].get(k) is not None and ln[n].get(k) is not None)  # P base: only where both scored it
    shares = max(abs(a["share"] - b["share"]) for a, b in zip(old["prompted"], new["prompted"]))
    print(f"lifts: largest relative difference {rel:.2g}; top 10 old {[r['number'] for r in old['lifts'][:10]]}, "
          f"new {[r['number'] for r in new['lifts'][:10]]}")
    print(f"prompted shares: largest absolute difference {shares:.2g}; same numbers "
          f"{[s['number'] for s in old['prompted']] == [s['number'] for s in new['prompted']]}")
    for label, res in (("old", old), ("new", new)):
        c = res["comparison"]
        print(f"{label}: entangled − random {c['diff']:+.6f}, p = {c['p_value']:.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trait", default="owl")
    ap.add_argument("--prompts", type=int, default=None, help="default: EntangleConfig's")
    ap.add_argument("--questions", type=int, default=None, help="default: EntangleConfig's")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--old-tree", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--count-flops", action="store_true", help="count the matmul FLOPs (one more run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("prompts", args.prompts), ("questions", args.questions)) if v is not None}
    print(f"{args.threads} threads; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    lm = load_model()
    versions: list[tuple[str, ModuleType]] = [("new", current)]
    if args.old_tree:
        versions.insert(0, ("old", old_entangle(args.old_tree)))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.reps):
            for label, module in versions:
                cfg = module.EntangleConfig(trait=args.trait, **overrides)
                t0 = time.perf_counter()
                results[label] = module.run_entangle(cfg, lm, Path(tmp) / label)
                t = results[label]["timings"]
                print(f"{label}: {time.perf_counter() - t0:.1f} s (lifts {t['lifts_s']} s); load average "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
        if args.count_flops:
            count_flops(current.EntangleConfig(trait=args.trait, **overrides), lm, Path(tmp) / "counted",
                        results["new"]["timings"])
    if args.old_tree:
        compare(results["old"], results["new"])


def count_flops(cfg: Any, lm: Any, out: Path, timings: dict[str, Any]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        current.run_entangle(cfg, lm, out)
    flops, rate = counter.get_total_flops(), matmul_flops(torch.float32)
    print(f"matmul FLOPs: {flops / 1e12:.2f} T; at this machine's fp32 torch.mm rate ({rate / 1e9:.0f} GFLOP/s) "
          f"they need {flops / rate:.0f} s; the timed run took {timings['total_s']:.0f} s")


if __name__ == "__main__":
    main()
