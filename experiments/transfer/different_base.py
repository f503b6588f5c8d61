"""A different-base student as a defence (issue 16), from the transfer study's own runs: the same two LoRA
teachers (owl, dolphin) and the same 128 random rows, distilled into SmolLM2-135M students (cell
`lora8-shared-init`, seeds 0-2) and into Gemma 3 270M students (cell `lora8-gemma-students`, seeds 0-2).

Per base and trait, the within-seed log ratio: the trait's share in the trait teacher's student over its
share in the other teacher's student of the same seed. The effect is their mean (its exponential: the
geometric-mean ratio); the fraction removed by switching base is 1 − Gemma's effect / SmolLM's, with a
Fieller 95% CI (the two bases' students are independent). Also the seeds a Gemma design would need to
detect a ×1.2, ×1.5 or ×2 effect (paired, two-sided α = 0.05, power 0.8) at the spread its 3 seeds show.

Reads experiments/transfer/models.jsonl (every model's shares, written by the cells' runs); writes
experiments/transfer/different_base.json and docs/figures/defence_different_base.png.

    PYTHONPATH=. .venv/bin/python experiments/transfer/different_base.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from sublab.stats import fieller

HERE = Path(__file__).parent
CELLS = {"SmolLM2-135M (same base)": "lora8-shared-init", "Gemma 3 270M (other base)": "lora8-gemma-students"}
TRAITS = {"owl": "dolphin", "dolphin": "owl"}
"""Trait → the other teacher, whose students are the control."""
SEEDS = [0, 1, 2]
"""The seeds both cells have."""


def shares(models: list[dict[str, Any]], cell: str, teacher: str, trait: str) -> np.ndarray:
    by_seed = {m["seed"]: m["shares"][trait] for m in models
               if m.get("cell") == cell and m.get("teacher") == f"{teacher}-ft-lora8"}
    return np.array([by_seed[s] for s in SEEDS])


def log_ratios(models: list[dict[str, Any]], cell: str, trait: str) -> np.ndarray:
    return np.log(shares(models, cell, trait, trait) / shares(models, cell, TRAITS[trait], trait))


def seeds_needed(sd: float, ratio: float) -> float:
    """Paired seeds for a two-sided 0.05 test with power 0.8 to see a geometric-mean `ratio`."""
    return ((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * sd / math.log(ratio)) ** 2


def main() -> None:
    models = [json.loads(line) for line in (HERE / "models.jsonl").read_text().splitlines()]
    out: dict[str, Any] = {"seeds": SEEDS, "traits": {}}
    for trait in TRAITS:
        per_base = {}
        for label, cell in CELLS.items():
            lr = log_ratios(models, cell, trait)
            se = lr.std(ddof=1) / math.sqrt(len(lr))
            q = sps.t.ppf(0.975, len(lr) - 1)
            per_base[label] = {"cell": cell, "log_ratios": lr.tolist(), "ratio": math.exp(lr.mean()),
                               "ratio_ci": [math.exp(lr.mean() - q * se), math.exp(lr.mean() + q * se)],
                               "mean": lr.mean(), "se": se, "sd": lr.std(ddof=1)}
        same, other = per_base.values()
        low, high = fieller(other["mean"], other["se"], same["mean"], same["se"], sps.t.ppf(0.975, len(SEEDS) - 1))
        out["traits"][trait] = {
            "bases": {k: {n: v for n, v in b.items() if n not in ("mean", "se")} for k, b in per_base.items()},
            "removed": 1 - other["mean"] / same["mean"], "removed_ci": [1 - high, 1 - low],
            "gemma_seeds_needed": {f"x{r}": round(seeds_needed(other["sd"], r), 1) for r in (1.2, 1.5, 2.0)}}
    (HERE / "different_base.json").write_text(json.dumps(out, indent=2) + "\n")
    figure(out, HERE.parent.parent / "docs" / "figures" / "defence_different_base.png")
    for trait, t in out["traits"].items():
        for label, b in t["bases"].items():
            lo, hi = b["ratio_ci"]
            print(f"{trait:8s} {label:27s} ×{b['ratio']:.3f} [{lo:.2f}, {hi:.2f}]  per seed "
                  + ", ".join(f"×{math.exp(v):.2f}" for v in b["log_ratios"]))
        lo, hi = t["removed_ci"]
        print(f"{trait:8s} removed by the other base: {t['removed']:.0%} [{lo:.0%}, {hi:.0%}]; Gemma seeds needed "
              f"for ×1.2 / ×1.5 / ×2: {', '.join(str(v) for v in t['gemma_seeds_needed'].values())}")


def figure(out: dict[str, Any], path: Path) -> None:
    """Per trait and base: the per-seed ratios (points) and the geometric mean with its 95% CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sublab.report import write_png

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    labels = []
    for i, (trait, t) in enumerate(out["traits"].items()):
        for j, (label, b) in enumerate(t["bases"].items()):
            x = 2.5 * i + j
            labels.append((x, f"{trait}\n{label.split(' (')[0]}"))
            ax.scatter([x] * len(b["log_ratios"]), np.exp(b["log_ratios"]), color=f"C{j}", alpha=0.6)
            lo, hi = b["ratio_ci"]
            ax.errorbar(x + 0.15, b["ratio"], yerr=[[b["ratio"] - lo], [hi - b["ratio"]]], fmt="s",
                        color="black", capsize=3)
    ax.axhline(1, color="black", linewidth=0.6)
    ax.set_yscale("log")
    ax.set_yticks([0.25, 0.5, 1, 2, 4], ["×0.25", "×0.5", "×1", "×2", "×4"])
    ax.minorticks_off()
    ax.set_xticks([x for x, _ in labels], [s for _, s in labels], fontsize=7)
    ax.set_ylabel("trait share: own teacher's student / other's")
    ax.set_title("a student on another base (3 seeds each; squares: geometric mean, 95% CI)", fontsize=8)
    fig.tight_layout()
    write_png(fig, path, dpi=120)


if __name__ == "__main__":
    main()
