"""Would bf16 do for the prompting half of `sublab entangle`? The stored runs' prompted shares, recomputed
in bf16 and in fp32 (a check against the stored fp32 values), with the entangled − random verdict and the
time of each.

    PYTHONPATH=. .venv/bin/python bench/entangle_precision.py owl dolphin eagle elephant

Needs runs/entangle-<trait>/entangle.json for each trait (`sublab entangle <trait>`). Writes nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sublab.entangle import NUMBER_SYSTEM_PROMPT, prompted_shares
from sublab.models import load_model
from sublab.stats import compare_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traits", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"bf16": load_model(dtype="bfloat16"), "fp32": load_model()}
    for trait in args.traits:
        stored = json.loads((Path("runs") / f"entangle-{trait}" / "entangle.json").read_text())
        tested = [(s["number"], s["group"]) for s in stored["prompted"]]
        systems = [None if n is None else NUMBER_SYSTEM_PROMPT.format(number=n) for n, _ in tested]
        reference = np.array([s["share"] for s in stored["prompted"]])
        old = stored["comparison"]
        for label, lm in models.items():
            t0 = time.perf_counter()
            shares = np.array(prompted_shares(lm, systems, trait, stored["question_ids"], stored["candidates"],
                                              stored["config"]["category"], threads=args.threads))
            seconds = time.perf_counter() - t0
            group = {g: [v for v, (_, h) in zip(shares, tested) if h == g] for g in ("entangled", "random")}
            c = compare_groups(group["entangled"], group["random"], seed=stored["config"]["seed"])
            print(f"{trait} {label}: {seconds:.1f} s; largest relative difference from the stored fp32 shares "
                  f"{np.max(np.abs(shares / reference - 1)):.2e}; entangled − random {c.diff:+.6f} "
                  f"[{c.ci_low:+.6f}, {c.ci_high:+.6f}], p = {c.p_value:.4f} (stored {old['diff']:+.6f}, "
                  f"p = {old['p_value']:.4f})", flush=True)


if __name__ == "__main__":
    main()
