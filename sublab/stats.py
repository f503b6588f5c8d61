"""Statistics for sublab: intervals, clustered scores and treatment-vs-control tests over seeds.

Reads and writes nothing: pure numpy/scipy functions, used by the eval stage to build `results.json`
and by `sublab.report` to render it.

The unit of analysis is the student (one fine-tuned model = one seed), never the sample (README, "Statistics"):
- one model's score on an eval is the mean over questions of the per-question mean
  (`score_by_question`, the paper's metric), with a CI from bootstrapping questions (samples of one
  question are correlated, so they are resampled together);
- a group of students is scored by `group_score`, resampling students and questions;
- treatment students are compared with control students (never with the base model) by
  `compare_groups`: a permutation test over seeds, exact when the relabellings can be enumerated.
All randomness takes an explicit seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import stats as sps

Alternative = Literal["two-sided", "greater", "less"]
Values = Sequence[float] | np.ndarray
"""Scores of independent units: a list or a 1-D array."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Score(_Frozen):
    """One model's score on one eval: mean over questions of per-question means."""

    mean: float
    ci_low: float | None
    """Lower CI bound; None when no interval can be computed (fewer than 2 questions)."""
    ci_high: float | None
    n_questions: int
    n_samples: int
    method: str
    """How the interval was computed, in words."""
    confidence: float = 0.95


class GroupScore(_Frozen):
    """A group of students (seeds) on one eval: mean over students of each student's score."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    n_students: int
    n_questions: int
    per_student: list[float]
    """Each student's score (mean over questions), in input order."""
    method: str
    confidence: float = 0.95


class Comparison(_Frozen):
    """Treatment students vs control students on one eval; the unit is the student (seed)."""

    treatment_mean: float
    control_mean: float
    diff: float
    """treatment_mean - control_mean."""
    ci_low: float | None
    """Lower bound of the diff's CI by `ci_method`; None when it is undefined (a group of 1 seed)."""
    ci_high: float | None
    ci_method: str
    p_value: float
    """Permutation-test p-value (see `test`)."""
    test: str
    n_treatment: int
    n_control: int
    min_p: float
    """Smallest p-value this design can produce: if > alpha, no result can be significant."""
    welch_p: float | None = None
    """Welch's t-test p-value (same alternative); None when undefined."""
    boot_ci_low: float | None = None
    """Percentile-bootstrap CI of the diff, resampling seeds within each group (secondary)."""
    boot_ci_high: float | None = None
    alternative: Alternative = "two-sided"
    confidence: float = 0.95


# --- intervals -------------------------------------------------------------------------------

def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(sps.norm.ppf(0.5 + confidence / 2))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n.

    Only valid for independent trials: for samples that share questions use `score_by_question`.
    With n=0 there is no information, so the interval is the whole range (0, 1).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clip rounding noise: at k=0 (k=n) the bound is exactly 0 (1).
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: Values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t CI over independent units (e.g. one score per seed).

    Returns (mean, low, high); low and high are NaN with fewer than 2 values.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    _z(confidence)  # validates confidence
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(sps.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def bootstrap_ci(values: Values, stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 10000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat(values)`, resampling values with replacement (seeded).

    Values must be independent units. With one value the interval collapses to that value.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    _z(confidence)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    if stat is np.mean:  # fast path for the common case
        boots = x[idx].mean(axis=1)
    else:
        boots = np.array([stat(x[i]) for i in idx], dtype=float)
    return _percentiles(boots, confidence)


def _percentiles(boots: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# --- clustered scores ------------------------------------------------------------------------

def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def question_means(records: Iterable[Any]) -> dict[str, tuple[float, int]]:
    """Per-question (mean value, sample count) from records with `question_id` and `value`.

    Records may be dicts or objects with those attributes; `value` is 0/1 or a probability.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in records:
        q = str(_field(r, "question_id"))
        sums[q] = sums.get(q, 0.0) + float(_field(r, "value"))
        counts[q] = counts.get(q, 0) + 1
    return {q: (sums[q] / counts[q], counts[q]) for q in sums}


def score_by_question(records: Iterable[Any], seed: int = 0, n_boot: int = 10000,
                      confidence: float = 0.95) -> Score:
    """The paper's metric for one model: mean over questions of the per-question mean value.

    The CI bootstraps over questions (a clustered bootstrap): samples of one question move together,
    so many samples of few questions do not give a falsely narrow interval.
    """
    per_q = question_means(records)
    if not per_q:
        raise ValueError("score_by_question needs at least one record")
    means = np.array([m for m, _ in per_q.values()])
    n_samples = sum(c for _, c in per_q.values())
    if means.size < 2:
        return Score(mean=float(means[0]), ci_low=None, ci_high=None, n_questions=1,
                     n_samples=n_samples, method="single question: no interval",
                     confidence=confidence)
    low, high = bootstrap_ci(means, np.mean, n_boot=n_boot, seed=seed, confidence=confidence)
    return Score(mean=float(means.mean()), ci_low=low, ci_high=high, n_questions=int(means.size),
                 n_samples=n_samples, method=f"percentile bootstrap over questions ({n_boot})",
                 confidence=confidence)


def question_matrix(records_by_student: Mapping[str, Iterable[Any]]) -> tuple[list[str], np.ndarray]:
    """Per-student per-question means as an array [n_students, n_questions], rows in mapping order.

    Every student must have been asked the same questions; returns (question_ids, matrix).
    """
    per_student = {s: question_means(recs) for s, recs in records_by_student.items()}
    if not per_student:
        raise ValueError("question_matrix needs at least one student")
    questions = sorted(next(iter(per_student.values())))
    for student, per_q in per_student.items():
        if sorted(per_q) != questions:
            diff = sorted(set(per_q) ^ set(questions))[:5]
            raise ValueError(f"student {student!r} was asked different questions than the others "
                             f"(e.g. {diff}); group scores need the same question set")
    matrix = np.array([[per_q[q][0] for q in questions] for per_q in per_student.values()])
    return questions, matrix


def group_score(per_student_question_means: np.ndarray | Sequence[Sequence[float]], seed: int = 0,
                n_boot: int = 10000, confidence: float = 0.95) -> GroupScore:
    """Mean over students of each student's question-averaged score, with a two-way bootstrap CI.

    Students and questions are crossed (every student answers the same questions), so each bootstrap
    draw resamples students and questions independently and takes the mean of the resampled
    sub-matrix. With one student only question variability is left, and `method` says so.
    """
    m = np.asarray(per_student_question_means, dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"group_score needs a non-empty [n_students, n_questions] array, got {m.shape}")
    _z(confidence)
    n_s, n_q = m.shape
    rng = np.random.default_rng(seed)
    # Resampling with replacement = multinomial counts; the sub-matrix mean is then w_s' M w_q.
    w_s = rng.multinomial(n_s, np.full(n_s, 1 / n_s), size=n_boot)
    w_q = rng.multinomial(n_q, np.full(n_q, 1 / n_q), size=n_boot)
    boots = np.einsum("bi,ij,bj->b", w_s, m, w_q) / (n_s * n_q)
    low, high = _percentiles(boots, confidence) if n_s * n_q > 1 else (None, None)
    what = "students and questions" if n_s > 1 else "questions only (one student)"
    return GroupScore(mean=float(m.mean()), ci_low=low, ci_high=high, n_students=n_s,
                      n_questions=n_q, per_student=[float(v) for v in m.mean(axis=1)],
                      method=f"percentile bootstrap over {what} ({n_boot})", confidence=confidence)


# --- treatment vs control --------------------------------------------------------------------

def _exceeds(stats: np.ndarray, observed: float, alternative: Alternative) -> np.ndarray:
    tol = 1e-9 * max(1.0, abs(observed))  # ties count as "at least as extreme" despite rounding
    if alternative == "greater":
        return stats >= observed - tol
    if alternative == "less":
        return stats <= observed + tol
    return np.abs(stats) >= abs(observed) - tol


def permutation_test(treatment: Values, control: Values, *,
                     alternative: Alternative = "two-sided", seed: int = 0, n_perm: int = 20000,
                     max_exact: int = 20000) -> tuple[float, float, str]:
    """Permutation test of the difference in means over relabellings of seeds.

    Exact (all C(n, n_treatment) relabellings) when there are at most `max_exact`, else a seeded
    Monte Carlo test with `n_perm` draws and p = (1 + hits) / (1 + n_perm).
    Returns (p_value, min_p, description).
    """
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    pooled = np.concatenate([t, c])
    n, n_t = pooled.size, t.size
    observed = t.mean() - c.mean()
    total = pooled.sum()
    n_relabel = math.comb(n, n_t)
    if n_relabel <= max_exact:
        idx = np.array(list(itertools.combinations(range(n), n_t)))
        kind, n_draws = "exact permutation", n_relabel
    else:
        rng = np.random.default_rng(seed)
        idx = np.argsort(rng.random((n_perm, n)), axis=1)[:, :n_t]
        kind, n_draws = f"Monte Carlo permutation ({n_perm} draws, seed {seed})", n_perm
    sum_t = pooled[idx].sum(axis=1)
    stats = sum_t / n_t - (total - sum_t) / (n - n_t)
    hits = int(_exceeds(stats, observed, alternative).sum())
    if n_relabel <= max_exact:
        p = hits / n_relabel
        # The mirror relabelling gives -diff, so with equal groups two extremes tie two-sided.
        min_p = (2 if alternative == "two-sided" and n_t == n - n_t else 1) / n_relabel
    else:
        p, min_p = (1 + hits) / (1 + n_draws), 1 / (1 + n_draws)
    return float(p), float(min_p), f"{kind} over seeds ({alternative}), difference in means"


def welch(treatment: Values, control: Values, confidence: float = 0.95,
          alternative: Alternative = "two-sided") -> tuple[float | None, float | None, float | None]:
    """Welch's t: (ci_low, ci_high, p) for mean(treatment) - mean(control).

    The CI is two-sided at `confidence`; p follows `alternative`. All None when undefined
    (a group with fewer than 2 seeds, or zero variance in both groups).
    """
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.size < 2 or c.size < 2:
        return None, None, None
    diff, se, df = welch_parts(t, c)
    if se == 0.0:
        return None, None, None
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(sps.ttest_ind(t, c, equal_var=False, alternative=alternative).pvalue)
    return diff - half, diff + half, p


def welch_parts(treatment: Values, control: Values) -> tuple[float, float, float]:
    """(difference of means, its standard error, Welch–Satterthwaite degrees of freedom)."""
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    vt, vc = t.var(ddof=1) / t.size, c.var(ddof=1) / c.size
    df = (vt + vc) ** 2 / (vt ** 2 / (t.size - 1) + vc ** 2 / (c.size - 1)) if vt + vc > 0 else math.inf
    return float(t.mean() - c.mean()), math.sqrt(vt + vc), df


def fieller(a: float, se_a: float, b: float, se_b: float, q: float) -> list[float]:
    """Fieller's interval for a / b with independent normal estimates and critical value q; [-inf, inf]
    when b is not clearly nonzero (then the ratio is unbounded)."""
    denom = b * b - q * q * se_b * se_b
    if denom <= 0:
        return [-math.inf, math.inf]
    disc = a * a * se_b * se_b + b * b * se_a * se_a - q * q * se_a * se_a * se_b * se_b
    half = q * math.sqrt(max(disc, 0.0))
    return sorted([(a * b - half) / denom, (a * b + half) / denom])


def ratio_interval(treatment: Values, control: Values, confidence: float = 0.95) -> tuple[float, list[float]]:
    """mean(treatment) / mean(control) and its Fieller interval (independent groups; q from Student's t at
    the Welch–Satterthwaite degrees of freedom, as the difference's CI in `welch`)."""
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    q = float(sps.t.ppf(0.5 + confidence / 2, welch_parts(t, c)[2]))
    se_t, se_c = float(t.std(ddof=1)) / math.sqrt(t.size), float(c.std(ddof=1)) / math.sqrt(c.size)
    return float(t.mean() / c.mean()), fieller(float(t.mean()), se_t, float(c.mean()), se_c, q)


def fraction_removed(treated: Values, control: Values, base_treated: Values, base_control: Values
                     ) -> dict[str, Any]:
    """The effect (mean treated − mean control) with its Welch 95% CI, and the fraction of a baseline's
    effect (base_treated − base_control) removed, 1 − effect / baseline effect, with a Fieller 95% CI for
    the ratio of the two effects (treated as independent, at the smaller of their Welch degrees of
    freedom). Students of one seed that share data order and init across the two designs are positively
    correlated, which this ignores: the CI is then conservative."""
    effect, se, df = welch_parts(treated, control)
    base, base_se, base_df = welch_parts(base_treated, base_control)
    low, high = fieller(effect, se, base, base_se, float(sps.t.ppf(0.975, min(df, base_df))))
    q_effect = float(sps.t.ppf(0.975, df))
    return {"effect": effect, "effect_ci": [effect - q_effect * se, effect + q_effect * se],
            "removed": 1 - effect / base if base else math.nan, "removed_ci": [1 - high, 1 - low],
            "n_treated": len(treated), "n_control": len(control)}


def _bootstrap_diff(t: np.ndarray, c: np.ndarray, n_boot: int, seed: int,
                    confidence: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    bt = t[rng.integers(0, t.size, size=(n_boot, t.size))].mean(axis=1)
    bc = c[rng.integers(0, c.size, size=(n_boot, c.size))].mean(axis=1)
    return _percentiles(bt - bc, confidence)


def compare_groups(treatment: Values, control: Values, seed: int = 0,
                   n_perm: int = 20000, confidence: float = 0.95,
                   alternative: Alternative = "two-sided", n_boot: int = 10000,
                   max_exact: int = 20000) -> Comparison:
    """Compare trait students with control students: one score per student (seed) in each group.

    Primary CI: Welch's t (percentile bootstrap over 3 seeds under-covers badly, so it is only
    reported as `boot_ci_*`). Primary test: permutation over seeds, exact when feasible. `min_p`
    tells whether the design could reach significance at all (3 vs 3 seeds: 0.1 two-sided).
    """
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.size == 0 or c.size == 0:
        raise ValueError(f"compare_groups needs >= 1 score per group, got {t.size} treatment "
                         f"and {c.size} control")
    if not (np.isfinite(t).all() and np.isfinite(c).all()):
        raise ValueError("compare_groups got a NaN or infinite score")
    _z(confidence)
    p, min_p, test = permutation_test(t, c, alternative=alternative, seed=seed, n_perm=n_perm,
                                      max_exact=max_exact)
    w_low, w_high, w_p = welch(t, c, confidence, alternative)
    b_low, b_high = _bootstrap_diff(t, c, n_boot, seed, confidence)
    if w_low is not None:
        ci_method = f"Welch t ({confidence:.0%}, two-sided)"
    else:
        ci_method = "none: Welch t needs >= 2 seeds per group and nonzero variance"
    return Comparison(treatment_mean=float(t.mean()), control_mean=float(c.mean()),
                      diff=float(t.mean() - c.mean()), ci_low=w_low, ci_high=w_high,
                      ci_method=ci_method, p_value=p, test=test, n_treatment=int(t.size),
                      n_control=int(c.size), min_p=min_p, welch_p=w_p, boot_ci_low=b_low,
                      boot_ci_high=b_high, alternative=alternative, confidence=confidence)


def compare_blocked(blocks: Sequence[tuple[float, Values]], seed: int = 0, n_perm: int = 20000,
                    confidence: float = 0.95, alternative: Alternative = "two-sided", n_boot: int = 10000,
                    max_exact: int = 200000) -> Comparison:
    """Treatment vs control when students come in blocks that share everything but the teacher.

    A block is (the treatment student's score, the scores of that block's control students), e.g. one
    dataset seed distilled from the trait teacher and from each control teacher. The effect is the mean
    over blocks of (treatment - mean of the block's controls), so dataset-to-dataset variance cancels.
    Test: permutation within blocks — under the null, the treatment label is equally likely to sit on
    any member of a block — exact when the relabellings can be enumerated. CI: t over the block
    differences; secondary CI: bootstrap over blocks.
    """
    if not blocks:
        raise ValueError("compare_blocked needs >= 1 block")
    members = [np.concatenate([[t], np.asarray(c, dtype=float)]) for t, c in blocks]
    if any(m.size < 2 for m in members):
        raise ValueError("compare_blocked: every block needs >= 1 control score")
    if not all(np.isfinite(m).all() for m in members):
        raise ValueError("compare_blocked got a NaN or infinite score")
    _z(confidence)
    # contrib[b][j]: block b's difference if member j were the treatment
    contrib = [m - (m.sum() - m) / (m.size - 1) for m in members]
    d = np.array([c[0] for c in contrib])
    observed = float(d.mean())
    n_relabel = math.prod(m.size for m in members)
    if n_relabel <= max_exact:
        sums = np.zeros(1)
        for c in contrib:
            sums = (sums[:, None] + c[None, :]).ravel()
        stats = sums / len(contrib)
        p = float(_exceeds(stats, observed, alternative).sum() / n_relabel)
        mirrored = alternative == "two-sided" and all(m.size == 2 for m in members)
        min_p = (2 if mirrored else 1) / n_relabel
        kind = f"exact permutation within {len(blocks)} blocks"
    else:
        rng = np.random.default_rng(seed)
        picks = np.stack([c[rng.integers(0, c.size, n_perm)] for c in contrib], axis=1)
        hits = int(_exceeds(picks.mean(axis=1), observed, alternative).sum())
        p, min_p = (1 + hits) / (1 + n_perm), 1 / (1 + n_perm)
        kind = f"Monte Carlo permutation within {len(blocks)} blocks ({n_perm} draws, seed {seed})"
    low = high = None
    if d.size >= 2 and d.std(ddof=1) > 0:
        _, low, high = t_interval(d, confidence)
    rng = np.random.default_rng(seed)
    b_low, b_high = _percentiles(d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1), confidence)
    n_control = sum(m.size - 1 for m in members)
    return Comparison(treatment_mean=float(np.mean([m[0] for m in members])),
                      control_mean=float(np.mean([m[1:].mean() for m in members])), diff=observed,
                      ci_low=low, ci_high=high,
                      ci_method=(f"t over the {d.size} block differences ({confidence:.0%}, two-sided)"
                                 if low is not None else "none: needs >= 2 blocks with varying differences"),
                      p_value=p, test=f"{kind} ({alternative}), mean within-block difference",
                      n_treatment=len(blocks), n_control=n_control, min_p=min_p, welch_p=None,
                      boot_ci_low=b_low, boot_ci_high=b_high, alternative=alternative, confidence=confidence)
