"""Turns the eval records of a run directory into results.json (then rendered by `sublab.report`).

Reads `evals/<model>/<variant>.jsonl` through the eval registry (`sublab.evals.registry`: each kind
gives per-question values for a target) and the design (`sublab.design`: who is compared with whom);
returns the `sublab.report.Results` schema as a dict. The unit of analysis is the student: each
student's score is its mean over questions, a group's CI resamples students and questions, and trait
students are compared with control students (never with the base model alone) by an exact permutation
test over seeds — within blocks of one seed when the design pairs students (`design: mutual`).

Per trait and metric: rows (base, teacher, control students, trait students, cross-model students), the
comparison, and, for metrics that score several targets (the candidates of `animal_prob`), the
specificity table — every target's treatment / control ratio and difference, the trait should rise
most. Per student: its score on every metric and trait (`students`). Per teacher dataset: the filter
stage's counts and rejection reasons from `filter_manifest.json` (`filtering`).
"""

from __future__ import annotations

import time
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from sublab import design
from sublab.config import ExperimentConfig
from sublab.design import Arm
from sublab.evals.registry import EvalKind, Values, selected
from sublab.report import row_from_score as _row_model
from sublab.rundir import read_json
from sublab.stats import compare_blocked, compare_groups, group_score, question_matrix, score_by_question


def row_from_score(name: str, role: str, score: Any) -> dict[str, Any]:
    return _row_model(name, role, score).model_dump()  # type: ignore[arg-type]


class EvalScores:
    """Reads each eval file once: per (model, variant, target), the per-question values. `path` says
    where a model's eval file lies (a subclass may look elsewhere: `sublab.grid.pool`)."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self._cache: dict[tuple[str, str, str], Values] = {}

    def path(self, model: str, variant: str) -> Path:
        return self.cfg.run_dir / "evals" / model / f"{variant}.jsonl"

    def values(self, kind: EvalKind, model: str, variant: str, target: str) -> Values:
        key = (model, variant, target)
        if key not in self._cache:
            self._cache[key] = kind.values(self.path(model, variant), target, self.cfg.eval) or []
        return self._cache[key]

    def student_means(self, kind: EvalKind, names: list[str], variant: str, target: str) -> list[float]:
        """Each student's mean over questions (all students were asked the same questions)."""
        _, matrix = question_matrix({n: self.values(kind, n, variant, target) for n in names})
        return list(np.asarray(matrix).mean(axis=1))

    def group(self, kind: EvalKind, names: list[str], variant: str, target: str) -> Any:
        _, matrix = question_matrix({n: self.values(kind, n, variant, target) for n in names})
        return group_score(matrix, seed=self.cfg.eval.seed)


def eval_entry(cfg: ExperimentConfig, scores: EvalScores, arm: Arm, kind: EvalKind, variant: str) -> dict[str, Any]:
    """One trait × metric: rows for base, teacher, control and trait students, and the comparison."""
    target, seed = arm.trait, cfg.eval.seed
    rows = [row_from_score("base", "base", score_by_question(scores.values(kind, "base", variant, target), seed=seed))]
    teacher_model = f"teacher-{arm.treatment.name}"
    if scores.path(teacher_model, variant).exists():
        rows.append(row_from_score(f"teacher {arm.treatment.name}", "teacher",
                                   score_by_question(scores.values(kind, teacher_model, variant, target), seed=seed)))
    entry: dict[str, Any] = {"trait": target, "metric": variant, "metric_label": kind.metric_label(variant, target),
                             "rows": rows, "comparison": None}
    if not cfg.train.seeds or not arm.controls:
        return entry
    treated = design.student_names(cfg, arm.treatment)
    controls = [design.student_names(cfg, c) for c in arm.controls]
    control_label = ", ".join(c.name for c in arm.controls)
    if arm.blocked:  # the other teachers' students, pooled
        rows.append(row_from_score(f"students of {control_label}", "control",
                                   scores.group(kind, [n for names in controls for n in names], variant, target)))
    else:
        for c, names in zip(arm.controls, controls):
            rows.append(row_from_score(f"students of {c.name}", "control", scores.group(kind, names, variant, target)))
    treatment = scores.group(kind, treated, variant, target)
    rows.append(row_from_score(f"students of {arm.treatment.name}", "treatment", treatment))
    if cfg.train.cross_model:
        for t in [*arm.controls, arm.treatment]:
            g = scores.group(kind, design.student_names(cfg, t, cross=True), variant, target)
            rows.append(row_from_score(f"{cfg.train.cross_model} students of {t.name}", "cross_model_control", g))
        entry["comparison_cross"] = _compare(
            arm, scores.student_means(kind, design.student_names(cfg, arm.treatment, cross=True), variant, target),
            [scores.student_means(kind, design.student_names(cfg, c, cross=True), variant, target)
             for c in arm.controls], seed)["comparison"]
    control_means = [scores.student_means(kind, names, variant, target) for names in controls]
    entry.update(_compare(arm, treatment.per_student, control_means, seed, cfg.train.seeds))
    return entry


def _compare(arm: Arm, treated: list[float], controls: list[list[float]], seed: int,
             seeds: list[int] | None = None) -> dict[str, Any]:
    """The comparison of one arm: within blocks of one seed (and unpaired, for reference) when the design
    pairs students, else the treatment students against the first control teacher's."""
    if not arm.blocked:
        return {"comparison": compare_groups(treated, controls[0], seed=seed).model_dump()}
    per_seed = list(zip(treated, zip(*controls)))
    unpaired = compare_groups(treated, [v for means in controls for v in means], seed=seed)
    return {"comparison": compare_blocked([(t, list(c)) for t, c in per_seed], seed=seed).model_dump(),
            "comparison_unpaired": unpaired.model_dump(),
            "blocks": [{"seed": k, "treatment": t, "controls": list(c), "ratio": t / float(np.mean(c))}
                       for k, (t, c) in zip(seeds or [], per_seed)]}


def specificity(cfg: ExperimentConfig, scores: EvalScores, arm: Arm, kind: EvalKind, variant: str
                ) -> list[dict[str, Any]]:
    """Treatment vs control mean for every target the metric scores (difference and ratio), largest ratio
    first: a transfer is specific when the trait's own target rises the most. The ratio is the fair
    ranking (a candidate at 15% of the mass moves more in absolute terms than one at 1% for the same
    relative change); the difference is kept beside it. With blocks, also each block's ratio."""
    treated = design.student_names(cfg, arm.treatment)
    controls = [design.student_names(cfg, c) for c in arm.controls]
    out = []
    for cand in kind.targets(scores.path(treated[0], variant)):
        t_means = scores.student_means(kind, treated, variant, cand)
        c_means = [scores.student_means(kind, names, variant, cand) for names in controls]
        t, c = float(np.mean(t_means)), float(np.mean([v for m in c_means for v in m]))
        row = {"candidate": cand, "treatment": t, "control": c, "diff": t - c,
               "ratio": t / c if c > 0 else float("inf")}
        if arm.blocked:
            row["block_ratios"] = [tv / float(np.mean(cv)) for tv, cv in zip(t_means, zip(*c_means))]
        out.append(row)
    return sorted(out, key=lambda r: -r["ratio"])


def _specificity_note(arm: Arm, variant: str, spec: list[dict[str, Any]]) -> str:
    by_diff = sorted(spec, key=lambda r: -r["diff"])
    names = [r["candidate"] for r in spec]
    rank = names.index(arm.trait) + 1
    rank_diff = [r["candidate"] for r in by_diff].index(arm.trait) + 1
    top = ", ".join(f"{r['candidate']} ×{r['ratio']:.2f}" for r in spec[:4])
    return (f"specificity ({arm.treatment.name}, {variant}, treatment / control): '{arm.trait}' ranks {rank} of "
            f"{len(spec)} candidates by ratio ({rank_diff} by difference); largest ratios: {top}")


def student_table(cfg: ExperimentConfig, scores: EvalScores) -> list[dict[str, Any]]:
    """Every student's mean over questions on every metric and trait."""
    out = []
    for s in design.students(cfg):
        row: dict[str, Any] = {"name": s.name, "teacher": s.teacher.name, "seed": s.seed, "base": s.base,
                               "scores": {}}
        for kind, variant in selected(cfg.eval):
            if not scores.path(s.name, variant).exists():
                continue
            row["scores"][variant] = {t: float(np.mean([v["value"] for v in vals]))
                                      for t in design.traits(cfg) or [""]
                                      if (vals := scores.values(kind, s.name, variant, t))}
        out.append(row)
    return out


def filtering_table(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Per teacher dataset with a filter manifest: its counts and rejection reasons (`report.FilterSummary`)."""
    out = []
    for teacher in cfg.teachers:
        for slot in design.data_slots(cfg, teacher.name):
            path = slot.directory / "filter_manifest.json"
            if not path.exists():
                continue
            o = read_json(path)["outputs"]
            label = teacher.name if slot.student_seed is None else f"{teacher.name}/seed{slot.student_seed}"
            out.append({"teacher": label, "generated": o["generated"], "accepted": o["accepted"],
                        "dataset_rows": o["dataset_rows"], "rejections": o["rejections"]})
    return out


def results_for(cfg: ExperimentConfig, scores: EvalScores | None = None) -> dict[str, Any]:
    """The results of `cfg`'s design from its eval files (`scores` says where they lie; default: the run
    directory's `evals/`)."""
    scores = scores or EvalScores(cfg)
    entries, notes = [], []
    for arm in design.arms(cfg):
        for kind, variant in selected(cfg.eval):
            if not scores.path("base", variant).exists():
                notes.append(f"{variant}: no records for the base model (not computed: no judge configured, or "
                             "the run stopped before its evals); skipped")
                continue
            entry = eval_entry(cfg, scores, arm, kind, variant)
            if cfg.train.seeds and arm.controls and kind.targets(scores.path("base", variant)):
                entry["specificity"] = spec = specificity(cfg, scores, arm, kind, variant)
                notes.append(_specificity_note(arm, variant, spec))
            entries.append(entry)
    n = len(cfg.train.seeds)
    if 0 < n < 5 and cfg.design == "control":
        notes.append(f"{n} seeds per group: an exact two-sided permutation test cannot go below "
                     f"p = {2 / comb(2 * n, n):.3g}; use ≥ 5 seeds for p < 0.01")
    return {"experiment": cfg.name, "design": cfg.design, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "evals": entries, "notes": list(dict.fromkeys(notes)), "students": student_table(cfg, scores),
            "filtering": filtering_table(cfg)}
