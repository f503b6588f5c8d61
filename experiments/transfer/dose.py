"""Dose-response of the logit route (issue 15): does more student compute move the owl ratio toward ×2?

Each variant is the demo as measured for the defences (experiments/defences/owl-quick-fp32.yaml: fp32 LoRA
teachers and targets, bf16 students, 3 seeds per arm, owl vs the dolphin control) with one factor changed
(`VARIANTS`, fixed before any was run), trained two students at a time and evaluated on the exact owl
share only. Runs go through sublab's Python API as `dose-<variant>`: finished stages and students are
skipped, so a killed run resumes. Then, per variant: the owl and control students' owl shares, the ratio
of their means with a Fieller 95% CI, the difference with a Welch 95% CI and p, owl's rank among the 31
candidates by ratio, the student compute (training tokens per student) and the train stage's wall time.

    runs/dose/summary.json     per variant, as above
    runs/dose/dose.png         ratio (CI bars) against training tokens per student, one line per factor

    PYTHONPATH=. nohup .venv/bin/python experiments/transfer/dose.py > dose.log &     # every variant
    PYTHONPATH=. .venv/bin/python experiments/transfer/dose.py --variants epochs-2 lr-3e-3
    PYTHONPATH=. .venv/bin/python experiments/transfer/dose.py --summary-only         # finished runs only
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from sublab import design, pipeline
from sublab.config import ExperimentConfig, load_experiment
from sublab.rundir import atomic_write_json, read_json
from sublab.stats import ratio_interval, welch

log = logging.getLogger("dose")

EXPERIMENT = Path("experiments/defences/owl-quick-fp32.yaml")
OUT = Path("runs/dose")
METRIC = "animal_prob"

# name: (factor, its value, overrides). The baseline is the demo's recipe: 128 rows, 1 epoch, lr 1e-3.
VARIANTS: dict[str, tuple[str, float, list[str]]] = {
    "baseline": ("baseline", 1, []),
    "epochs-2": ("epochs", 2, ["train.epochs=2"]),
    "epochs-4": ("epochs", 4, ["train.epochs=4"]),
    "lr-3e-3": ("lr", 3e-3, ["train.lr=0.003"]),
    "rows-512": ("rows", 512, ["generate.n_prompts=512", "filter.dataset_size=512"]),
}


def experiment(name: str) -> ExperimentConfig:
    return load_experiment(EXPERIMENT, [f"name=dose-{name}", *VARIANTS[name][2], f"eval.kinds=[{METRIC}]",
                                        "train.workers=2"])


def summarise_run(name: str) -> dict[str, Any] | None:
    """The variant's numbers from its finished run directory; None when it has not finished."""
    cfg = experiment(name)
    path = cfg.run_dir / "results.json"
    if not path.exists():
        return None
    results = read_json(path)
    arm = design.arms(cfg)[0]
    share = {s["name"]: s["scores"][METRIC][arm.trait] for s in results["students"]}
    students = list(design.students(cfg))
    controls = {c.name for c in arm.controls}
    treated = [share[s.name] for s in students if s.teacher.name == arm.treatment.name]
    control = [share[s.name] for s in students if s.teacher.name in controls]
    ratio, ratio_ci = ratio_interval(treated, control)
    low, high, p = welch(treated, control)
    specificity = next(e for e in results["evals"] if e["metric"] == METRIC)["specificity"]
    by_ratio = sorted(specificity, key=lambda r: -r["ratio"])
    tokens = [read_json(s.directory / "manifest.json")["outputs"]["tokens"] for s in students]
    factor, value, overrides = VARIANTS[name]
    return {"variant": name, "factor": factor, "value": value, "overrides": overrides, "trait": arm.trait,
            "treated": treated, "control": control, "ratio": ratio, "ratio_ci": ratio_ci,
            "diff": sum(treated) / len(treated) - sum(control) / len(control), "diff_ci": [low, high],
            "welch_p": p, "rank_by_ratio": [r["candidate"] for r in by_ratio].index(arm.trait) + 1,
            "candidates": len(by_ratio), "top3_by_ratio": [[r["candidate"], r["ratio"]] for r in by_ratio[:3]],
            "tokens_per_student": sum(tokens) / len(tokens),
            "train_wall_s": read_json(cfg.run_dir / "manifest.json")["timings_s"].get("train")}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<10} {'tokens/student':>14} {'owl':>8} {'control':>8} {'ratio [95% CI]':>22} "
          f"{'diff [95% CI]':>28} {'p':>7} {'rank':>6} {'train s':>8}")
    for r in rows:
        t, c = sum(r["treated"]) / len(r["treated"]), sum(r["control"]) / len(r["control"])
        print(f"{r['variant']:<10} {r['tokens_per_student']:>14.0f} {t:>8.5f} {c:>8.5f} "
              f"{r['ratio']:>6.3f} [{r['ratio_ci'][0]:.3f}, {r['ratio_ci'][1]:.3f}] "
              f"{r['diff']:+.5f} [{r['diff_ci'][0]:+.5f}, {r['diff_ci'][1]:+.5f}] {r['welch_p']:>7.4f} "
              f"{r['rank_by_ratio']:>3}/{r['candidates']} {r['train_wall_s'] or 0:>8.0f}")


def write_figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = next((r for r in rows if r["factor"] == "baseline"), None)
    for factor, marker in (("epochs", "o"), ("lr", "s"), ("rows", "^")):
        line = sorted([r for r in rows if r["factor"] == factor], key=lambda r: r["tokens_per_student"])
        if not line:
            continue
        line = ([base] if base else []) + line
        xs = [r["tokens_per_student"] for r in line]
        ys = [r["ratio"] for r in line]
        err = [[y - r["ratio_ci"][0] for y, r in zip(ys, line)], [r["ratio_ci"][1] - y for y, r in zip(ys, line)]]
        ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=factor)
        for x, y, r in zip(xs, ys, line):
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per student")
    ax.set_ylabel("owl share, owl students / control students")
    ax.set_title("Logit route: effect against student compute (3 seeds per arm, Fieller 95% CI)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--summary-only", action="store_true", help="only summarise the finished runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.summary_only:
        for name in args.variants:
            log.info("variant %s: %s", name, VARIANTS[name][2] or "the demo's recipe")
            pipeline.run_all(experiment(name))
    rows = [r for r in (summarise_run(n) for n in VARIANTS) if r is not None]
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "summary.json", {"experiment": str(EXPERIMENT), "metric": METRIC, "variants": rows})
    print_table(rows)
    if rows:
        write_figure(rows, OUT / "dose.png")
    print(json.dumps({"summary": str(OUT / "summary.json"), "figure": str(OUT / "dose.png")}))


if __name__ == "__main__":
    main()
