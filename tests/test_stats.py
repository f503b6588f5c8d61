"""Tests for sublab.stats: intervals, clustered scores, permutation tests (fast, seeded, offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from sublab.stats import (bootstrap_ci, compare_blocked, compare_groups, group_score, permutation_test, ratio_interval,
                          question_matrix, score_by_question, t_interval, welch, wilson_interval)

# --- Wilson ----------------------------------------------------------------------------------


def test_wilson_k0_matches_closed_form():
    # At k=0 the Wilson upper bound reduces to z^2 / (n + z^2).
    z = sps.norm.ppf(0.975)
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    assert high == pytest.approx(0.2775328, abs=1e-6)


@pytest.mark.parametrize("k,n,conf", [(0, 10, 0.95), (5, 10, 0.95), (10, 10, 0.95), (3, 50, 0.9),
                                      (1, 1, 0.99), (37, 200, 0.95)])
def test_wilson_matches_scipy(k, n, conf):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
    low, high = wilson_interval(k, n, conf)
    assert low == pytest.approx(ref.low, abs=1e-12)
    assert high == pytest.approx(ref.high, abs=1e-12)


def test_wilson_k5_n10_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2365931, 0.7634069), abs=1e-6)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=95)


# --- t and bootstrap -------------------------------------------------------------------------

def test_t_interval_matches_scipy():
    x = [0.1, 0.4, 0.35, 0.2]
    mean, low, high = t_interval(x, 0.9)
    ref = sps.t.interval(0.9, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert mean == pytest.approx(np.mean(x))
    assert (low, high) == pytest.approx(ref)
    m1, l1, h1 = t_interval([0.3])
    assert m1 == 0.3 and math.isnan(l1) and math.isnan(h1)


def test_bootstrap_is_deterministic_under_seed():
    x = np.random.default_rng(1).normal(size=30)
    a = bootstrap_ci(x, seed=7, n_boot=2000)
    assert a == bootstrap_ci(x, seed=7, n_boot=2000)
    assert a != bootstrap_ci(x, seed=8, n_boot=2000)
    assert a[0] < x.mean() < a[1]


def test_bootstrap_custom_stat_and_close_to_normal_theory():
    x = np.random.default_rng(2).normal(loc=1.0, size=200)
    low, high = bootstrap_ci(x, n_boot=4000, seed=0)
    _, t_low, t_high = t_interval(x)
    assert low == pytest.approx(t_low, abs=0.04) and high == pytest.approx(t_high, abs=0.04)
    m_low, m_high = bootstrap_ci(x, stat=np.median, n_boot=500, seed=0)
    assert m_low < np.median(x) < m_high


# --- clustered scores ------------------------------------------------------------------------

def test_score_is_mean_of_question_means_not_sample_mean():
    records = [{"question_id": "q1", "value": 1}] * 4 + [{"question_id": "q2", "value": 0}]
    s = score_by_question(records, n_boot=200)
    assert s.mean == 0.5  # the sample mean would be 0.8
    assert (s.n_questions, s.n_samples) == (2, 5)


def test_single_question_has_no_interval():
    s = score_by_question([{"question_id": "q", "value": 1.0}, {"question_id": "q", "value": 0.0}])
    assert s.ci_low is None and s.ci_high is None and "single question" in s.method


def test_clustered_ci_is_wider_than_naive_when_questions_differ():
    rng = np.random.default_rng(0)
    rates = np.where(np.arange(20) % 2 == 0, 0.9, 0.1)  # questions differ a lot
    records = [{"question_id": f"q{q}", "value": int(rng.random() < p)}
               for q, p in enumerate(rates) for _ in range(50)]
    clustered = score_by_question(records, seed=0, n_boot=4000)
    k = sum(r["value"] for r in records)
    naive = wilson_interval(k, len(records))
    assert clustered.ci_high - clustered.ci_low > 2.5 * (naive[1] - naive[0])
    assert clustered.ci_low < clustered.mean < clustered.ci_high


def test_question_matrix_aligns_and_rejects_mismatch():
    qs, m = question_matrix({"s0": [{"question_id": "b", "value": 1}, {"question_id": "a", "value": 0}],
                             "s1": [{"question_id": "a", "value": 1}, {"question_id": "b", "value": 1}]})
    assert qs == ["a", "b"]
    assert m.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="s1"):
        question_matrix({"s0": [{"question_id": "a", "value": 1}],
                         "s1": [{"question_id": "b", "value": 1}]})


def test_group_score_reflects_student_variation():
    rng = np.random.default_rng(3)
    base = rng.random((1, 40)) * 0.2
    same = np.repeat(base, 3, axis=0)
    spread = same + np.array([[0.0], [0.3], [0.6]])  # students differ by large offsets
    g_same = group_score(same, seed=1, n_boot=3000)
    g_spread = group_score(spread, seed=1, n_boot=3000)
    assert g_spread.per_student == pytest.approx(spread.mean(axis=1).tolist())
    assert g_spread.mean == pytest.approx(spread.mean())
    assert (g_spread.ci_high - g_spread.ci_low) > 3 * (g_same.ci_high - g_same.ci_low)
    assert g_spread == group_score(spread, seed=1, n_boot=3000)  # seeded
    assert "questions only" in group_score(base, n_boot=100).method


# --- permutation tests and comparisons --------------------------------------------------------

def test_exact_permutation_by_hand():
    # 20 relabellings of 6 seeds into 3+3; only [3,4,5] as treatment gives diff = +3.
    t, c = [3, 4, 5], [0, 1, 2]
    p, min_p, test = permutation_test(t, c, alternative="greater")
    assert (p, min_p) == (pytest.approx(1 / 20), pytest.approx(1 / 20)) and "exact" in test
    p, min_p, _ = permutation_test(t, c)
    assert (p, min_p) == (pytest.approx(2 / 20), pytest.approx(0.1))
    assert permutation_test(t, c, alternative="less")[0] == pytest.approx(1.0)


def test_exact_permutation_counts_ties():
    # pooled [1, 1, 0, 1]: 3 of 6 relabellings give +0.5 and 3 give -0.5.
    assert permutation_test([1, 1], [0, 1], alternative="greater")[0] == pytest.approx(0.5)
    assert permutation_test([1, 1], [0, 1])[0] == pytest.approx(1.0)


def test_monte_carlo_agrees_with_exact_and_is_seeded():
    rng = np.random.default_rng(5)
    t, c = rng.normal(0.8, 1, 5), rng.normal(0, 1, 5)
    exact, _, _ = permutation_test(t, c)
    mc, mc_min, test = permutation_test(t, c, max_exact=0, n_perm=20000, seed=1)
    assert "Monte Carlo" in test and mc_min == pytest.approx(1 / 20001)
    assert mc == pytest.approx(exact, abs=0.015)
    assert mc == permutation_test(t, c, max_exact=0, n_perm=20000, seed=1)[0]


def test_permutation_p_is_not_small_under_null():
    rng = np.random.default_rng(11)
    exact_ps = [permutation_test(rng.normal(size=4), rng.normal(size=4))[0] for _ in range(300)]
    assert 0.4 < np.mean(exact_ps) < 0.65  # exact p is ~uniform (slightly conservative) under H0
    assert np.mean(np.array(exact_ps) <= 0.05) <= 0.08
    mc_ps = [permutation_test(rng.normal(size=12), rng.normal(size=12), n_perm=1000, seed=i)[0]
             for i in range(60)]  # C(24, 12) > 20000: Monte Carlo
    assert 0.35 < np.mean(mc_ps) < 0.65


def test_compare_groups_n3_reports_design_floor():
    cmp = compare_groups([3, 4, 5], [0, 1, 2])
    assert cmp.diff == 3.0 and cmp.p_value == pytest.approx(0.1) and cmp.min_p == pytest.approx(0.1)
    assert "exact permutation" in cmp.test and "two-sided" in cmp.test
    assert cmp.n_treatment == 3 and cmp.n_control == 3
    assert "Welch" in cmp.ci_method and cmp.ci_low < 3 < cmp.ci_high
    assert cmp.boot_ci_low is not None and cmp.boot_ci_low <= 3 <= cmp.boot_ci_high
    assert compare_groups([3, 4, 5], [0, 1, 2], alternative="greater").min_p == pytest.approx(0.05)


def test_welch_matches_scipy():
    t, c = [3, 4, 5.5], [0, 1, 2]
    ref = sps.ttest_ind(t, c, equal_var=False)
    low, high, p = welch(t, c)
    assert (low, high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert p == pytest.approx(ref.pvalue)
    assert compare_groups(t, c).welch_p == pytest.approx(ref.pvalue)


def test_compare_groups_one_seed_each_has_no_ci_and_cannot_be_significant():
    cmp = compare_groups([0.9], [0.1])
    assert cmp.ci_low is None and cmp.ci_high is None and cmp.ci_method.startswith("none")
    assert cmp.welch_p is None and cmp.min_p == 1.0 and cmp.p_value == 1.0


def test_compare_groups_rejects_bad_input():
    with pytest.raises(ValueError, match="treatment"):
        compare_groups([], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        compare_groups([float("nan"), 1.0], [0.1, 0.2])


# --- blocked comparisons -------------------------------------------------------------------------

def test_compare_blocked_by_hand():
    # two blocks of three: treatment vs two controls each; 3 x 3 = 9 relabellings
    blocks = [(3.0, [1.0, 2.0]), (5.0, [4.0, 0.0])]
    r = compare_blocked(blocks, alternative="greater")
    assert r.diff == pytest.approx(((3 - 1.5) + (5 - 2)) / 2)
    assert r.treatment_mean == 4.0 and r.control_mean == pytest.approx(1.75)
    # every relabelling's statistic, by hand: block 1 contributes 1.5, -1.5 or 0; block 2 3, 1.5, -4.5
    stats = [(a + b) / 2 for a in (1.5, -1.5, 0.0) for b in (3.0, 1.5, -4.5)]
    assert r.p_value == pytest.approx(sum(s >= r.diff - 1e-12 for s in stats) / 9) == pytest.approx(1 / 9)
    assert r.min_p == pytest.approx(1 / 9) and r.n_treatment == 2 and r.n_control == 4


def test_compare_blocked_cancels_block_effects_that_sink_an_unpaired_test():
    rng = np.random.default_rng(1)
    level = rng.normal(0, 1.0, 6)  # datasets differ a lot; the teacher adds a small, steady +0.1
    blocks = [(lv + 0.1 + rng.normal(0, 0.01), list(lv + rng.normal(0, 0.01, 3))) for lv in level]
    blocked = compare_blocked(blocks)
    unpaired = compare_groups([t for t, _ in blocks], [c for _, cs in blocks for c in cs])
    assert blocked.p_value <= 2 / 4 ** 6 + 1e-12 and blocked.ci_low > 0
    assert unpaired.p_value > 0.5


def test_compare_blocked_is_calibrated_under_the_null():
    rng = np.random.default_rng(0)
    ps = np.array([compare_blocked([(rng.normal(), list(rng.normal(size=3))) for _ in range(5)]).p_value
                   for _ in range(400)])
    assert 0.02 < (ps <= 0.05).mean() < 0.09
    assert 0.06 < (ps <= 0.1).mean() < 0.15


def test_compare_blocked_pairs_have_the_mirror_floor_and_bad_input_fails():
    r = compare_blocked([(1.0, [0.0]), (2.0, [0.5]), (1.5, [1.0])])
    assert r.min_p == pytest.approx(2 / 8) and r.p_value == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="control score"):
        compare_blocked([(1.0, [])])
    with pytest.raises(ValueError, match="NaN"):
        compare_blocked([(1.0, [float("nan")])])


def test_ratio_interval_is_fiellers_for_the_ratio_of_two_group_means():
    treated, control = [0.012, 0.010, 0.011], [0.0080, 0.0085, 0.0090]
    ratio, (low, high) = ratio_interval(treated, control)
    assert ratio == pytest.approx(0.011 / 0.0085)
    assert 1 < low < ratio < high  # every treated above every control: the interval excludes 1
    se_t, se_c = 0.001 / 3 ** 0.5, 0.0005 / 3 ** 0.5
    q = sps.t.ppf(0.975, (se_t ** 2 + se_c ** 2) ** 2 / (se_t ** 4 / 2 + se_c ** 4 / 2))  # Welch's df
    for r in (low, high):  # the bounds solve (mean_t − r·mean_c)² = q²(se_t² + r²·se_c²)
        assert (0.011 - r * 0.0085) ** 2 == pytest.approx(q * q * (se_t ** 2 + r * r * se_c ** 2))
    assert ratio_interval([0.01, 0.02, 0.03], [0.0, 0.01, -0.01])[1] == [-math.inf, math.inf]
