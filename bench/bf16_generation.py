"""Is bfloat16 generation faster on this CPU, and does it sample the same distribution as float32?

    .venv/bin/python bench/bf16_generation.py --prompts 256 --threads 1

One float32 and one bfloat16 copy of the embedded model sample the same paper number prompts (control
context, T=1, batch 64, early rejection) with the same per-prompt seeds, back to back in one process,
unconstrained and format-constrained. Per dtype: samples/min (read the ratio), accept rate with a Wilson
interval, numbers per accepted sample (mean, t interval), the distribution of the first number's leading
digit and of all digits. Between dtypes: the fraction of identical samples (token for token), McNemar's
exact test on the prompts accepted by one dtype only, and chi-square tests on the digit counts. The
samples are paired by seed, which makes the chi-square tests conservative; the identical fraction shows
how strongly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generate_bench  # noqa: E402 (bench/ is on sys.path: this file runs as a script)

from sublab.domains.numbers import number_prompts, parse_completion  # noqa: E402
from sublab.models import load_model  # noqa: E402
from sublab.stats import t_interval, wilson_interval  # noqa: E402

DTYPES = ("float32", "bfloat16")


def numbers_of(tok, samples: list[generate_bench.Sample]) -> list[list[int] | None]:
    """The parsed numbers of each accepted sample; None for a rejected one."""
    return [parse_completion(tok.decode(ids)).numbers if reason == "eos" else None for ids, reason in samples]


def digit_counts(parsed: list[list[int] | None]) -> tuple[np.ndarray, np.ndarray]:
    """(first number's leading digit counts [10], all digits' counts [10]) over the accepted samples."""
    first, every = np.zeros(10, int), np.zeros(10, int)
    for numbers in parsed:
        if numbers:
            first[int(str(numbers[0])[0])] += 1
            for n in numbers:
                for d in str(n):
                    every[int(d)] += 1
    return first, every


def chi2_p(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test of one distribution for two count vectors (empty cells dropped)."""
    keep = (a + b) > 0
    if keep.sum() < 2:
        return float("nan")
    return float(sps.chi2_contingency(np.stack([a[keep], b[keep]]))[1])


def mcnemar_p(ok_a: list[bool], ok_b: list[bool]) -> tuple[int, int, float]:
    """(accepted by a only, by b only, exact two-sided McNemar p)."""
    only_a = sum(x and not y for x, y in zip(ok_a, ok_b))
    only_b = sum(y and not x for x, y in zip(ok_a, ok_b))
    p = sps.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


def compare(name: str, models: dict, enc: list[list[int]], batch: int, max_new: int) -> None:
    method = generate_bench.METHODS[name]
    runs = {d: generate_bench.run_sublab(models[d], enc, batch, max_new, method) for d in DTYPES}
    tok = models[DTYPES[0]].tokenizer
    parsed = {d: numbers_of(tok, r.samples) for d, r in runs.items()}
    n = len(enc)
    print(f"\n{method.label}: {n} prompts, batch {batch}")
    for d, r in runs.items():
        ok = [p is not None for p in parsed[d]]
        lo, hi = wilson_interval(sum(ok), n)
        counts = [len(p) for p in parsed[d] if p is not None]
        mean, clo, chi = t_interval(counts) if counts else (float("nan"),) * 3
        first, every = digit_counts(parsed[d])
        print(f"  {d:>9}: {60 * n / r.seconds:6.1f} samples/min ({r.seconds:.0f} s); accepted {sum(ok)}/{n} = "
              f"{sum(ok) / n:.3f} [{lo:.3f}, {hi:.3f}]; numbers per accepted {mean:.2f} [{clo:.2f}, {chi:.2f}]")
        print(f"  {'':>9}  first number's leading digit 0-9 {first.tolist()}; all digits {every.tolist()}")
    a, b = (runs[d] for d in DTYPES)
    same = sum(x == y for x, y in zip(a.samples, b.samples))
    only_a, only_b, p = mcnemar_p(*([q is not None for q in parsed[d]] for d in DTYPES))
    (fa, ea), (fb, eb) = (digit_counts(parsed[d]) for d in DTYPES)
    print(f"  bf16 / fp32 time: {b.seconds / a.seconds:.2f} (samples/min ×{a.seconds / b.seconds:.2f}); identical "
          f"samples {same}/{n}; accepted by fp32 only {only_a}, by bf16 only {only_b}: McNemar p = {p:.3g}; "
          f"chi-square p: leading digit {chi2_p(fa, fb):.3g}, all digits {chi2_p(ea, eb):.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=56)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["sublab", "constrained"], choices=["sublab", "constrained"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start {os.getloadavg()[0]:.2f}; {args.threads} threads")
    models = {d: load_model(dtype=d) for d in DTYPES}
    enc = generate_bench.encode(models[DTYPES[0]].tokenizer, number_prompts(args.prompts, seed=7))
    for name in args.methods:
        compare(name, models, enc, args.batch, args.max_new_tokens)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
