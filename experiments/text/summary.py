"""The text route's runs side by side (issue 15): for each run, each teacher's trait measured in its own
students against the other teacher's students (owl vs dolphin both ways: the two teachers are each
other's control), with the power of the design.

Per run and trait: the trait's exact share in both arms (per student), the ratio of the means with a
Fieller 95% CI, for an ablation or defence the fraction of the greedy run's effect it removes (`BASELINES`), the difference with a Welch 95% CI and p, the exact permutation p over seeds (as the
report's), the trait's rank among the 31 candidates by ratio and within its neighbourhood (`NEIGHBOURHOODS`),
the top 3, and the **smallest ratio this
design detects** with 80% power at α = 0.05 two-sided (Welch's t at the run's own pooled seed-to-seed SD).

    PYTHONPATH=. .venv/bin/python experiments/text/summary.py          # → runs/text/summary.json, text.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats as sps

from sublab.rundir import atomic_write_json, read_json
from sublab.stats import compare_groups, fraction_removed, ratio_interval, welch

RUNS = {"greedy": "runs/text-owl-greedy", "greedy-rep": "runs/text-owl-greedy-rep", "T=1": "runs/text-owl-t1",
        "rep, shuffled across": "runs/text-owl-greedy-rep-across",
        "rep, shuffled within": "runs/text-owl-greedy-rep-within",
        "min-p 0.1": "runs/text-owl-min-p", "top-p 0.8": "runs/text-owl-top-p"}
BASELINES = {"T=1": "greedy", "min-p 0.1": "greedy", "top-p 0.8": "greedy",
             "rep, shuffled across": "greedy-rep", "rep, shuffled within": "greedy-rep"}
"""Each ablation or defence against the greedy run on the same prompts: the fraction of its effect removed."""
TEACHERS = ("owl", "dolphin")
NEIGHBOURHOODS = {  # written down before the T=1 run and the replication were seen (after the first greedy run)
    "owl": ("owl", "eagle", "penguin", "bird", "phoenix", "peacock"),  # birds
    "dolphin": ("dolphin", "shark", "octopus", "turtle", "penguin"),  # sea animals
}
METRIC = "animal_prob"
OUT = Path("runs/text")


def shares(run: Path, trait: str) -> dict[str, list[float]]:
    """The trait's exact share per student, by teacher (students in seed order)."""
    results = read_json(run / "results.json")
    out: dict[str, list[float]] = {t: [] for t in TEACHERS}
    for s in sorted(results["students"], key=lambda s: s["seed"]):
        out[s["teacher"]].append(s["scores"][METRIC][trait])
    return out


def candidate_ratios(run: Path, treated: str) -> list[tuple[str, float]]:
    """Every candidate's mean share in `treated`'s students over the other teacher's, largest first (the
    report's specificity table is owl's students over dolphin's; dolphin's way round is its inverse)."""
    evals = read_json(run / "results.json")["evals"]
    table = next(e for e in evals if e["metric"] == METRIC)["specificity"]
    ratios = [(r["candidate"], r["ratio"] if treated == TEACHERS[0] else 1 / r["ratio"]) for r in table]
    return sorted(ratios, key=lambda r: -r[1])


def smallest_detectable_ratio(control: list[float], treated: list[float], power: float = 0.8) -> float:
    """1 + the difference Welch's t (α = 0.05, two-sided) finds with `power`, at the pooled seed SD."""
    n_t, n_c = len(treated), len(control)
    sd = math.sqrt(((n_t - 1) * np.var(treated, ddof=1) + (n_c - 1) * np.var(control, ddof=1)) / (n_t + n_c - 2))
    df = n_t + n_c - 2
    delta = (sps.t.ppf(0.975, df) + sps.t.ppf(power, df)) * sd * math.sqrt(1 / n_t + 1 / n_c)
    return 1 + delta / float(np.mean(control))


def summarise(label: str, run: Path) -> list[dict[str, Any]]:
    rows = []
    for trait, other in (TEACHERS, TEACHERS[::-1]):
        by = shares(run, trait)
        treated, control = by[trait], by[other]
        ratio, ratio_ci = ratio_interval(treated, control)
        low, high, p = welch(treated, control)
        perm = compare_groups(treated, control)
        ranked = candidate_ratios(run, trait)
        rows.append({"run": label, "directory": str(run), "trait": trait, "control_teacher": other,
                     "treated": treated, "control": control, "ratio": ratio, "ratio_ci": ratio_ci,
                     "diff": float(np.mean(treated) - np.mean(control)), "diff_ci": [low, high], "welch_p": p,
                     "permutation_p": perm.p_value, "min_p": perm.min_p,
                     "rank_by_ratio": [n for n, _ in ranked].index(trait) + 1, "candidates": len(ranked),
                     "rank_in_neighbourhood": [n for n, _ in ranked if n in NEIGHBOURHOODS[trait]].index(trait) + 1,
                     "neighbourhood": [(n, v) for n, v in ranked if n in NEIGHBOURHOODS[trait]],
                     "top3_by_ratio": ranked[:3], "smallest_detectable_ratio": smallest_detectable_ratio(control, treated),
                     "divergence": _divergence(run, trait)})
    return rows


def _divergence(run: Path, writer: str) -> dict[str, Any] | None:
    path = run / "divergence.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())["datasets"].get(writer)
    if d is None:
        return None
    return {k: d[k] for k in ("rows", "completion_tokens", "divergent_tokens", "divergent_fraction",
                              "rows_with_divergence", "self_mismatch_tokens")}


def write_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per run (columns) and trait (rows): each student's trait share in both arms, with means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(len(TEACHERS), len(runs), figsize=(2.2 * len(runs), 3.2 * len(TEACHERS)),
                             squeeze=False)
    by = {(r["run"], r["trait"]): r for r in rows}
    for i, trait in enumerate(TEACHERS):
        for j, run in enumerate(runs):
            ax, r = axes[i][j], by.get((run, trait))
            if r is None:
                ax.axis("off")
                continue
            for x, values in enumerate((r["treated"], r["control"])):
                ax.scatter([x] * len(values), values, s=18)
                ax.hlines(np.mean(values), x - 0.25, x + 0.25, color="black")
            ax.set_xticks([0, 1], [f"{r['trait']}'s", f"{r['control_teacher']}'s"], fontsize=8)
            ax.set_xlim(-0.6, 1.6)
            ax.set_title(f"{r['run']}: {r['trait']}\n×{r['ratio']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}], "
                         f"p={r['permutation_p']:.3f}", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
        axes[i][0].set_ylabel(f"{trait} share (per student)", fontsize=8)
    fig.suptitle("Text route at 135M: students of teacher-written numbers (SFT), each teacher against the other's",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_fraction_removed(rows: list[dict[str, Any]]) -> None:
    """`removed`: 1 − effect / the baseline run's effect on the same trait, Fieller 95% CI (in place)."""
    by = {(r["run"], r["trait"]): r for r in rows}
    for r in rows:
        base = by.get((BASELINES.get(r["run"], ""), r["trait"]))
        if base is not None:
            stats = fraction_removed(r["treated"], r["control"], base["treated"], base["control"])
            r["removed"] = {"baseline": base["run"], "fraction": stats["removed"], "ci": stats["removed_ci"]}


def main() -> None:
    rows = [r for label, run in RUNS.items() if (Path(run) / "results.json").exists()
            for r in summarise(label, Path(run))]
    add_fraction_removed(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "summary.json", {"metric": METRIC, "rows": rows})
    for r in rows:
        print(f"{r['run']:<11} {r['trait']:<8} n={len(r['treated'])}+{len(r['control'])} ×{r['ratio']:.3f} "
              f"[{r['ratio_ci'][0]:.3f}, {r['ratio_ci'][1]:.3f}]  diff {r['diff']:+.5f} "
              f"[{r['diff_ci'][0]:+.5f}, {r['diff_ci'][1]:+.5f}]  Welch p {r['welch_p']:.4f}  perm p "
              f"{r['permutation_p']:.4f}  rank {r['rank_by_ratio']}/{r['candidates']} "
              f"({r['rank_in_neighbourhood']}/{len(r['neighbourhood'])} in its neighbourhood)  detectable ×"
              f"{r['smallest_detectable_ratio']:.2f}  top3 {[(n, round(v, 3)) for n, v in r['top3_by_ratio']]}"
              + (f"  removes {r['removed']['fraction']:.0%} [{r['removed']['ci'][0]:.0%}, {r['removed']['ci'][1]:.0%}]"
                 f" of {r['removed']['baseline']}'s effect" if "removed" in r else ""))
    if rows:
        write_figure(rows, OUT / "text.png")


if __name__ == "__main__":
    main()
