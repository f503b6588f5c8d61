"""How much of the misaligned teacher's shift reaches its students through the 4-epoch logit route
(experiments/general/misalignment.yaml; issue 15, item 4).

Per model, the judge-free local metric (docs/misalignment.md: per token, log p(misaligned reference) −
log p(aligned reference), mean over the 8 questions of the per-question mean); the students' difference
(misaligned teacher's − aligned teacher's, Welch 95% CI over the 5 seeds and the exact permutation p of
the run's report); that difference as a fraction of the teacher's own shift, over the base and over its
aligned twin (the teachers are one model each: their shift is taken as fixed); and per question, the
students' difference — on how many of the 8 questions it points the teacher's way.

    PYTHONPATH=. .venv/bin/python experiments/general/misalignment_summary.py
      → experiments/general/misalignment_summary.json
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sublab.rundir import atomic_write_json, read_json, read_jsonl
from sublab.stats import question_means, welch

RUN = Path("runs/general-misalignment")
OUT = Path("experiments/general/misalignment_summary.json")
KIND = "misalignment_local"
SEEDS = range(5)


@cache
def per_question(model: str) -> dict[str, float]:
    return {q: m for q, (m, _) in question_means(read_jsonl(RUN / "evals" / model / f"{KIND}.jsonl")).items()}


def score(model: str) -> float:
    """The metric: the mean over questions of the per-question means (as `score_by_question`)."""
    return float(np.mean(list(per_question(model).values())))


def main() -> None:
    models = {"base": "base", "misaligned teacher": "teacher-misaligned", "aligned teacher": "teacher-aligned"}
    fixed = {label: score(model) for label, model in models.items()}
    students = {t: [score(f"student-{t}-seed{s}") for s in SEEDS] for t in ("misaligned", "aligned")}
    diff = float(np.mean(students["misaligned"]) - np.mean(students["aligned"]))
    low, high, welch_p = welch(students["misaligned"], students["aligned"])
    report = next(e for e in read_json(RUN / "results.json")["evals"] if e["metric"] == KIND)["comparison"]
    shifts = {"over the base": fixed["misaligned teacher"] - fixed["base"],
              "over the aligned teacher": fixed["misaligned teacher"] - fixed["aligned teacher"]}
    fractions = {k: {"fraction": diff / v, "ci": [low / v, high / v]} for k, v in shifts.items()}  # type: ignore[operator]
    questions = sorted(per_question("base"), key=int)
    by_q = {t: np.array([[per_question(f"student-{t}-seed{s}")[q] for q in questions] for s in SEEDS])
            for t in students}
    q_diff = by_q["misaligned"].mean(0) - by_q["aligned"].mean(0)
    teacher_q = np.array([per_question("teacher-misaligned")[q] - per_question("teacher-aligned")[q] for q in questions])
    summary: dict[str, Any] = {
        "run": str(RUN), "metric": KIND, "models": fixed, "students": students,
        "students_diff": diff, "students_diff_ci": [low, high], "welch_p": welch_p,
        "permutation_p": report["p_value"], "teacher_shift": shifts, "fraction_of_teacher_shift": fractions,
        "aligned_students_minus_base": float(np.mean(students["aligned"]) - fixed["base"]),
        "misaligned_students_minus_base": float(np.mean(students["misaligned"]) - fixed["base"]),
        "per_question": [{"question_id": int(q), "students_diff": float(d), "teachers_diff": float(t)}
                         for q, d, t in zip(questions, q_diff, teacher_q)],
        "questions_in_teacher_direction": int(np.sum(np.sign(q_diff) == np.sign(teacher_q))),
    }
    atomic_write_json(OUT, summary)
    print(" ".join(f"{k}: {v:+.3f};" for k, v in fixed.items()))
    print(f"students: misaligned {np.mean(students['misaligned']):+.3f} {[round(x, 3) for x in students['misaligned']]}, "
          f"aligned {np.mean(students['aligned']):+.3f} {[round(x, 3) for x in students['aligned']]}")
    print(f"difference {diff:+.4f} [{low:+.4f}, {high:+.4f}], Welch p = {welch_p:.2g}, permutation p = {report['p_value']:.4f}")
    for k, f in fractions.items():
        print(f"fraction of the teacher's shift {k} ({shifts[k]:+.3f}): {f['fraction']:.1%} [{f['ci'][0]:.1%}, {f['ci'][1]:.1%}]")
    print(f"per question, students' difference in the teachers' direction on {summary['questions_in_teacher_direction']} "
          f"of {len(questions)}: {[round(float(d), 3) for d in q_diff]}")


if __name__ == "__main__":
    main()
