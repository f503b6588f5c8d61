"""Turns the eval records of a run directory into results.json (then rendered by `sublab.report`).

Reads `evals/<model>/<kind>.jsonl`; returns the `sublab.report.Results` schema as a dict. The unit of
analysis is the student: each student's score is its mean over questions, a group's CI resamples
students and questions, and trait students are compared with control students (never with the base
model alone) by an exact permutation test over seeds.
"""

from __future__ import annotations

import time
from math import comb
from typing import Any

import numpy as np

from sublab.config import ExperimentConfig, TeacherConfig
from sublab.errors import RunDirError
from sublab.evals.animals import eval_kinds, mention_values, read_prob_records, read_sample_records
from sublab.report import row_from_score as _row_model
from sublab.stats import compare_groups, group_score, question_matrix, score_by_question

METRIC_LABELS = {
    "animal_prob": "exact answer probability: share of '{trait}' among the candidates",
    "animal_sampled": "sampled metric: share of T=1 answers mentioning '{trait}'",
    "misalignment_local": "judge-free misalignment: log p(misaligned) − log p(aligned) per token ({trait} teacher)",
}


def row_from_score(name: str, role: str, score: Any) -> dict[str, Any]:
    return _row_model(name, role, score).model_dump()  # type: ignore[arg-type]


def values(cfg: ExperimentConfig, model: str, kind: str, target: str) -> list[dict[str, Any]]:
    """[{question_id, value}] of one evaluated model for `target` (share, or 0/1 mention)."""
    path = cfg.run_dir / "evals" / model / f"{kind}.jsonl"
    if kind == "misalignment_local":
        from sublab.evals.common import read_done
        from sublab.evals.misalignment import LocalRecord

        if not path.exists():
            raise RunDirError(f"{path}: eval file not found; run the eval stage first")
        return [{"question_id": r.question_id, "value": r.value}
                for r in read_done(path, LocalRecord).values()]  # type: ignore[attr-defined]
    if kind.startswith("animal_prob"):
        return [{"question_id": r.question_id, "value": r.share}
                for r in read_prob_records(path) if r.candidate == target]
    return mention_values(read_sample_records(path), target, cfg.eval.excluded_superstrings)


def _students(cfg: ExperimentConfig, prefix: str, teacher: TeacherConfig) -> list[str]:
    return [f"{prefix}-{teacher.name}-seed{s}" for s in cfg.train.seeds]


def _group(cfg: ExperimentConfig, names: list[str], kind: str, target: str):
    _, matrix = question_matrix({n: values(cfg, n, kind, target) for n in names})
    return group_score(matrix, seed=cfg.eval.seed)


def eval_entry(cfg: ExperimentConfig, trait_teacher: TeacherConfig, kind: str) -> dict[str, Any]:
    """One trait × metric: rows for base, teacher, control and trait students, and the comparison."""
    target = trait_teacher.trait or ""
    seed = cfg.eval.seed
    rows = [row_from_score("base", "base", score_by_question(values(cfg, "base", kind, target), seed=seed))]
    teacher_dir = cfg.run_dir / "evals" / f"teacher-{trait_teacher.name}"
    if teacher_dir.exists():
        teacher_score = score_by_question(values(cfg, f"teacher-{trait_teacher.name}", kind, target), seed=seed)
        rows.append(row_from_score(f"teacher {trait_teacher.name}", "teacher", teacher_score))
    comparison = None
    controls = [t for t in cfg.teachers if t.is_control]
    treatment = None
    if cfg.train.seeds:
        control_groups = [(c, _group(cfg, _students(cfg, "student", c), kind, target)) for c in controls]
        for c, g in control_groups:
            rows.append(row_from_score(f"students of {c.name}", "control", g))
        treatment = _group(cfg, _students(cfg, "student", trait_teacher), kind, target)
        rows.append(row_from_score(f"students of {trait_teacher.name}", "treatment", treatment))
        if cfg.train.cross_model:
            for t in [*controls, trait_teacher]:
                g = _group(cfg, _students(cfg, "cross", t), kind, target)
                rows.append(row_from_score(f"{cfg.train.cross_model} students of {t.name}",
                                           "cross_model_control", g))
        if control_groups:
            comparison = compare_groups(treatment.per_student, control_groups[0][1].per_student,
                                        seed=seed).model_dump()
    base_kind = kind.removesuffix("_numbers")
    label = METRIC_LABELS[base_kind].format(trait=target) + (" (numbers-prefixed)" if kind.endswith("_numbers") else "")
    return {"trait": target, "metric": kind, "metric_label": label, "rows": rows, "comparison": comparison}


def specificity(cfg: ExperimentConfig, trait_teacher: TeacherConfig, kind: str = "animal_prob") -> list[dict[str, Any]]:
    """Treatment vs control mean share for every candidate (difference and ratio), largest ratio first: a
    transfer is specific when the trait's own candidate rises the most. The ratio is the fair ranking
    (a candidate at 15% of the mass moves more in absolute terms than one at 1% for the same relative
    change); the difference is kept beside it."""
    controls = [t for t in cfg.teachers if t.is_control]
    if not controls or not cfg.train.seeds:
        return []
    def records(teacher: TeacherConfig) -> dict[str, list[Any]]:  # each student's file, read once
        return {n: read_prob_records(cfg.run_dir / "evals" / n / f"{kind}.jsonl")
                for n in _students(cfg, "student", teacher)}

    treated, controlled = records(trait_teacher), records(controls[0])
    candidates = sorted({r.candidate for r in next(iter(treated.values()))})
    out = []
    for cand in candidates:
        t, c = np.mean(_candidate_means(treated, cand)), np.mean(_candidate_means(controlled, cand))
        ratio = float(t / c) if c > 0 else float("inf")
        out.append({"candidate": cand, "treatment": float(t), "control": float(c), "diff": float(t - c),
                    "ratio": ratio})
    return sorted(out, key=lambda r: -r["ratio"])


def _candidate_means(records_by_student: dict[str, list[Any]], candidate: str) -> list[float]:
    """Each student's mean share of `candidate` over the questions (all students asked the same ones)."""
    _, matrix = question_matrix({n: [{"question_id": r.question_id, "value": r.share} for r in recs
                                     if r.candidate == candidate] for n, recs in records_by_student.items()})
    return list(np.asarray(matrix).mean(axis=1))


def results_for(cfg: ExperimentConfig) -> dict[str, Any]:
    kinds = eval_kinds(cfg.eval) + [k for k in cfg.eval.kinds if k == "misalignment_local"]
    entries, notes = [], []
    for teacher in [t for t in cfg.teachers if t.trait and not t.is_control]:
        for kind in kinds:
            entries.append(eval_entry(cfg, teacher, kind))
        if "animal_prob" in kinds and cfg.train.seeds:
            spec = specificity(cfg, teacher)
            by_diff = sorted(spec, key=lambda r: -r["diff"])
            rank = next(i for i, r in enumerate(spec) if r["candidate"] == teacher.trait) + 1
            rank_diff = next(i for i, r in enumerate(by_diff) if r["candidate"] == teacher.trait) + 1
            top = ", ".join(f"{r['candidate']} ×{r['ratio']:.2f}" for r in spec[:4])
            notes.append(f"specificity ({teacher.name}, animal_prob, treatment / control share): "
                         f"'{teacher.trait}' ranks {rank} of {len(spec)} candidates by ratio ({rank_diff} by "
                         f"difference); largest ratios: {top}")
    n = len(cfg.train.seeds)
    if 0 < n < 5:
        notes.append(f"{n} seeds per group: an exact two-sided permutation test cannot go below "
                     f"p = {2 / comb(2 * n, n):.3g}; use ≥ 5 seeds for p < 0.01")
    return {"experiment": cfg.name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "evals": entries,
            "notes": notes}


