"""Defences against subliminal transfer on the demo experiment: how much of the owl effect each removes,
and what it costs a distillation user.

For each named defence (`DEFENCES`: `--set` overrides of `train.distill.defence`, with `none` the baseline
and `random-10` the control defence), runs the demo as it was measured (experiments/defences/
owl-quick-fp32.yaml: fp32 teachers, targets and evals, bf16 students) as `defence-<name>` (animal_prob
only) through sublab's Python API — finished stages and students are skipped, so a killed run resumes —
then reads every student's owl share from the run's results.json and writes:

    runs/defences/summary.json      per defence: owl students' and control students' owl share, the effect
                                    (difference) with a 95% CI, the fraction of the baseline effect removed
                                    with a 95% CI, the defence's cost from the students' manifests, and the
                                    utility probe
    runs/defences/defences.png      fraction of the baseline effect removed (CI bars), alone and against
                                    the utility probe
    runs/defences/utility/<run>.json  the utility probe per student (reused while its fingerprint matches)

CIs: the effect's is Welch's t over seeds (a percentile bootstrap over 3 seeds per arm under-covers badly,
see `sublab.stats.compare_groups`); the fraction removed gets Fieller's interval for the ratio of the
defence's effect to the baseline's, both from Welch's t, as if independent. Students of one seed share
data order and adapter init across defences, a positive correlation this ignores: conservative.
The fraction removed is 1 − effect / baseline effect and only means something when the baseline's effect
is clearly above 0.

Utility probe: each student's mean KL(teacher ‖ student) over the format columns, per completion position,
on 32 held-out rows (the paper's number prompts and uniform random numbers from seed `HELD_OUT_SEED`, which
no student trained on); the teacher's targets on them through the targets cache. The base's KL is the
untrained reference. How much worse a defended student imitates its teacher is the price of the defence.

    PYTHONPATH=. nice .venv/bin/python experiments/defences/run.py                      # every defence
    PYTHONPATH=. nice .venv/bin/python experiments/defences/run.py --defences none random-10 divergence-10
    PYTHONPATH=. .venv/bin/python experiments/defences/run.py --summary-only            # tables of finished runs
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublab import design, pipeline
from sublab.config import ExperimentConfig, load_experiment
from sublab.domains import get_domain
from sublab.generate import random_completion_of
from sublab.models import load_model, resolve_device
from sublab.rundir import atomic_write_json, read_json
from sublab.stats import fraction_removed
from sublab.teachers import Teacher, build_teacher
from sublab.train import Example, encode_examples, format_columns, reference_sha256
from sublab.train.defences import kl_rows
from sublab.train.targets import compute_targets, load_or_compute, own_inputs

log = logging.getLogger("defences")

EXPERIMENT = Path("experiments/defences/owl-quick-fp32.yaml")
OUT = Path("runs/defences")
METRIC = "animal_prob"
HELD_OUT_ROWS = 32
HELD_OUT_SEED = 10_000
"""Prompt and completion seed of the utility probe's rows (the demo trains on prompt seed 0, seed 0)."""

D = "train.distill.defence"
DEFENCES: dict[str, list[str]] = {
    "none": [],
    "random-10": [f"{D}.mask=random", f"{D}.fraction=0.1"],
    "divergence-10": [f"{D}.mask=divergence", f"{D}.fraction=0.1"],
    "divergence-10-base": [f"{D}.mask=divergence", f"{D}.fraction=0.1", f"{D}.action=base"],
    "divergence-30": [f"{D}.mask=divergence", f"{D}.fraction=0.3"],
    "log-ratio-10": [f"{D}.mask=log_ratio", f"{D}.fraction=0.1"],
    "top-k-3": [f"{D}.top_k=3"],
    "min-p-0.1": [f"{D}.min_p=0.1"],
    "temperature-0.5": [f"{D}.temperature=0.5"],
    "temperature-2": [f"{D}.temperature=2.0"],
    "noise-1": [f"{D}.noise=1.0"],
    "mix-50": [f"{D}.mix=0.5"],
}
"""Name → `--set` overrides. `random-10` is the control defence: a mask as large as `divergence-10`'s
at random positions."""


def experiment(name: str) -> ExperimentConfig:
    """The demo experiment with this defence, evaluated on the exact owl share only."""
    return load_experiment(EXPERIMENT, [f"name=defence-{name}", *DEFENCES[name], f"eval.kinds=[{METRIC}]"])


# --- statistics -------------------------------------------------------------------------------------

# --- one run ------------------------------------------------------------------------------------------

def owl_shares(cfg: ExperimentConfig) -> tuple[str, dict[str, float], dict[str, float]]:
    """(trait, owl share per treated student, per control student) from the run's results.json."""
    arm = design.arms(cfg)[0]
    results = read_json(cfg.run_dir / "results.json")
    share = {s["name"]: s["scores"][METRIC][arm.trait] for s in results["students"]}
    controls = {c.name for c in arm.controls}
    treated = {s.name: share[s.name] for s in design.students(cfg) if s.teacher.name == arm.treatment.name}
    control = {s.name: share[s.name] for s in design.students(cfg) if s.teacher.name in controls}
    return arm.trait, treated, control


def defence_cost(cfg: ExperimentConfig) -> dict[str, float | None]:
    """The defence's cost averaged over the run's students (from their manifests; zeros without one)."""
    keys = ("positions_dropped", "positions_replaced", "rows_replaced", "mean_kl_teacher_defended",
            "mean_kl_defended_teacher")
    costs = [read_json(s.directory / "manifest.json").get("defence") or {k: 0.0 for k in keys}
             for s in design.students(cfg)]
    out: dict[str, float | None] = {}
    for k in keys:
        values = [c[k] for c in costs]
        out[k] = None if any(v is None for v in values) else float(np.mean(values))
    return out


def held_out_rows(cfg: ExperimentConfig) -> list[Example]:
    """Rows from the demo's generator with another seed: prompts and uniform random completions."""
    domain = get_domain(cfg.domain)
    return [Example(p.id, p.text, random_completion_of(domain, p, HELD_OUT_SEED).strip())
            for p in domain.prompts(HELD_OUT_ROWS, HELD_OUT_SEED)]


def imitation_kl(model_ref: str, teacher: Teacher, rows: list[Example], cfg: ExperimentConfig,
                 device: str = "cpu", teacher_model: Any = None) -> float:
    """Mean KL(teacher ‖ model) per completion position over the format columns on `rows` (nats)."""
    lm = load_model(model_ref, device=device)
    loaded = teacher_model or teacher.load(device=device)
    encoded = encode_examples(lm.tokenizer, rows, cfg.train.max_seq_len, teacher)
    cols = format_columns(lm.tokenizer, None, get_domain(cfg.domain))[0].to(device)
    targets = load_or_compute(loaded.model, reference_sha256(teacher.model_ref or ""), encoded,
                              loaded.tokenizer.pad_token_id, cols, None, device, teacher.name, progress=False)
    own, _ = compute_targets(lm.model, own_inputs(encoded), lm.tokenizer.pad_token_id, cols, None, device,
                             progress=False)
    return float(kl_rows(torch.cat(targets.values), torch.cat(own)).mean())


def utility(cfg: ExperimentConfig, device: str) -> dict[str, Any]:
    """Per student (and the base, per teacher), `imitation_kl` to its own teacher on the held-out rows;
    cached per run under OUT/utility, recomputed for a student whose fingerprint changed."""
    path = OUT / "utility" / f"{cfg.name}.json"
    cache = read_json(path) if path.exists() else {}
    rows = held_out_rows(cfg)
    for t in {s.teacher.name: s.teacher for s in design.students(cfg)}.values():
        teacher, loaded = build_teacher(t, cfg.base_model, device=device), None
        for name, ref, fp in [(f"base-{t.name}", cfg.base_model, reference_sha256(cfg.base_model))] + [
                (s.name, str(s.directory), read_json(s.directory / "manifest.json")["fingerprint"])
                for s in design.students(cfg) if s.teacher.name == t.name]:
            if cache.get(name, {}).get("fingerprint") == fp:
                continue
            loaded = loaded or teacher.load(device=device)
            cache[name] = {"fingerprint": fp, "kl": imitation_kl(ref, teacher, rows, cfg, device, loaded)}
            atomic_write_json(path, cache)
    return cache


# --- the summary ----------------------------------------------------------------------------------------

def summarise(names: list[str], device: str) -> dict[str, Any]:
    """The summary of every finished run among `names` (the baseline `none` must be one of them)."""
    configs = {n: experiment(n) for n in names}
    runs = {n: cfg for n, cfg in configs.items() if (cfg.run_dir / "results.json").exists()}
    if "none" not in runs:
        raise SystemExit("the baseline run `none` has not finished; run it first")
    shares = {n: owl_shares(cfg) for n, cfg in runs.items()}
    trait, base_t, base_c = shares["none"]
    out: dict[str, Any] = {"experiment": str(EXPERIMENT), "trait": trait, "metric": METRIC,
                           "ci": "Welch t (effect), Fieller (fraction removed)", "held_out_rows": HELD_OUT_ROWS, "held_out_seed": HELD_OUT_SEED,
                           "defences": {}}
    for name, cfg in runs.items():
        _, treated, control = shares[name]
        stats = fraction_removed(list(treated.values()), list(control.values()), list(base_t.values()),
                             list(base_c.values()))
        util = utility(cfg, device)
        students = [u["kl"] for k, u in util.items() if not k.startswith("base-")]
        out["defences"][name] = {
            "overrides": DEFENCES[name], "treated_share": float(np.mean(list(treated.values()))),
            "control_share": float(np.mean(list(control.values()))), "treated": treated, "control": control,
            **stats, "cost": defence_cost(cfg),
            "utility": {"mean_kl_teacher_student": float(np.mean(students)),
                        "mean_kl_teacher_base": float(np.mean([u["kl"] for k, u in util.items()
                                                               if k.startswith("base-")])),
                        "students": {k: u["kl"] for k, u in util.items()}}}
    out["defences"]["none"].update(removed=0.0, removed_ci=[0.0, 0.0])  # by definition
    return out


def print_table(summary: dict[str, Any]) -> None:
    head = (f"{'defence':<20} {'owl':>8} {'control':>8} {'effect [95% CI]':>28} {'removed [95% CI]':>24} "
            f"{'dropped':>8} {'replaced':>8} {'KL(t‖d)':>8} {'KL(d‖t)':>8} {'KL(t‖s)':>8}")
    print(f"{summary['trait']} share ({summary['metric']}); KL in nats per position; KL(t‖s): held-out utility probe")
    print(head)
    for name, d in summary["defences"].items():
        c, e, r = d["cost"], d["effect_ci"], d["removed_ci"]
        kl_td = "inf" if c["mean_kl_teacher_defended"] is None else f"{c['mean_kl_teacher_defended']:.4f}"
        print(f"{name:<20} {d['treated_share']:>8.4f} {d['control_share']:>8.4f} "
              f"{d['effect']:>+9.4f} [{e[0]:+.4f}, {e[1]:+.4f}] {d['removed']:>7.0%} [{r[0]:+.0%}, {r[1]:+.0%}]"
              f" {c['positions_dropped']:>8.1%} {c['positions_replaced']:>8.1%} {kl_td:>8}"
              f" {c['mean_kl_defended_teacher']:>8.4f} {d['utility']['mean_kl_teacher_student']:>8.4f}")


def write_figure(summary: dict[str, Any], path: Path) -> None:
    """Left: the fraction of the baseline effect each defence removes, 95% CI bars. Right: the same against
    its cost to a distillation user, the held-out KL(teacher ‖ student) (the baseline's students marked)."""
    import matplotlib.pyplot as plt

    from sublab.report import write_png

    rows = summary["defences"]
    names = [n for n in rows if n != "none"]
    removed = np.array([rows[n]["removed"] for n in names])
    ci = np.clip(np.array([rows[n]["removed_ci"] for n in names]).reshape(-1, 2), -2, 3)  # an unbounded CI: clipped
    err = [removed - ci[:, 0], ci[:, 1] - removed]
    colors = ["C7" if n.startswith("random") else "C0" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    left.bar(range(len(names)), removed, color=colors)
    left.errorbar(range(len(names)), removed, yerr=err, fmt="none", ecolor="black", capsize=3)
    left.set_xticks(range(len(names)), names, rotation=40, ha="right")
    left.set_ylabel("fraction of the baseline effect removed")
    cost = np.array([rows[n]["utility"]["mean_kl_teacher_student"] for n in names])
    right.errorbar(cost, removed, yerr=err, fmt="o", color="C0", ecolor="grey", capsize=2)
    for x, y, n in zip(cost, removed, names):
        right.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    right.axvline(rows["none"]["utility"]["mean_kl_teacher_student"], color="C2", lw=0.8, ls=":",
                  label="students, no defence")
    right.axvline(rows["none"]["utility"]["mean_kl_teacher_base"], color="C3", lw=0.8, ls=":",
                  label="the untrained base")
    right.set_xscale("log")
    right.set_xlabel("held-out KL(teacher ‖ student), nats per position (cost)")
    right.legend(fontsize=7, loc="lower right")
    for ax in (left, right):
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(1, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"defences on the demo: {summary['trait']} effect removed (95% CI: Fieller over seeds) "
                 "and what it costs", fontsize=10)
    write_png(fig, path, dpi=150, tight=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=list(DEFENCES),
                        help="which defences to run (default: all; `none` is always included)")
    parser.add_argument("--summary-only", action="store_true", help="summarise finished runs; train nothing")
    parser.add_argument("--device", default="auto", help="for the utility probe: cpu, cuda or auto (the runs "
                        "use the experiment's `device`)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = ["none", *[n for n in args.defences if n != "none"]]
    if not args.summary_only:
        for name in names:
            log.info("defence %s: %s", name, " ".join(DEFENCES[name]) or "(baseline)")
            pipeline.run_all(experiment(name))
    summary = summarise(names, resolve_device(args.device))
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "summary.json", summary)
    write_figure(summary, OUT / "defences.png")
    print_table(summary)
    print(f"wrote {OUT / 'summary.json'} and {OUT / 'defences.png'}")


if __name__ == "__main__":
    main()
