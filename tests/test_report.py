"""Tests for sublab.report: results.json validation, report.md, figures and the console summary."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from rich.console import Console

from sublab.errors import RunDirError
from sublab.report import (Results, bar_figure, figure_table, load_results, print_summary,
                           row_from_score, validate_results, verdict, write_report)
from sublab.stats import compare_groups, group_score, score_by_question


def _rows(trait: str, students: list[float] | None) -> list[dict]:
    rows = [
        {"name": "base", "role": "base", "n_models": 1, "mean": 0.03, "ci_low": 0.02,
         "ci_high": 0.04, "n": 50, "ci_method": "bootstrap over questions"},
        {"name": f"teacher:{trait}", "role": "teacher", "n_models": 1, "mean": 0.41,
         "ci_low": 0.35, "ci_high": 0.47, "n": 50, "ci_method": "bootstrap over questions"},
    ]
    if students is not None:
        rows += [
            {"name": "control students", "role": "control", "n_models": 3,
             "per_model": [0.03, 0.031, 0.029], "mean": 0.03, "ci_low": 0.025, "ci_high": 0.035,
             "n": 50, "ci_method": "bootstrap over students and questions"},
            {"name": f"{trait} students", "role": "treatment", "n_models": len(students),
             "per_model": students, "mean": float(np.mean(students)), "ci_low": min(students),
             "ci_high": max(students), "n": 50, "ci_method": "bootstrap over students and questions"},
        ]
    return rows


@pytest.fixture
def results() -> dict:
    owl = [0.061, 0.072, 0.055]
    return {
        "experiment": "owl-quick",
        "created_at": "2025-01-01T00:00:00",
        "evals": [
            {"trait": "owl", "metric": "exact_prob",
             "metric_label": "P(owl) among candidates, held-out questions",
             "rows": _rows("owl", owl),
             "comparison": compare_groups(owl, [0.03, 0.031, 0.029]).model_dump()},
            {"trait": "eagle", "metric": "exact_prob", "metric_label": "P(eagle)",
             "rows": _rows("eagle", None), "comparison": None},
            {"trait": "owl", "metric": "mention_rate", "rows": _rows("owl", owl)[:2]},
        ],
        "notes": ["only 3 seeds: min achievable p = 0.1"],
    }


def test_write_report_renders_table_comparison_and_figures(results, tmp_path):
    path = write_report(results, tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "| owl students | treatment | 3 | 50 | 0.0627 | [0.055, 0.072] |" in text
    assert "| teacher:eagle | teacher | 1 | 50 | 0.41 | [0.35, 0.47] |" in text
    assert "exact permutation over seeds (two-sided)" in text and "p = 0.1" in text
    assert "design cannot reach significance at α=0.05 with 3 vs 3 seeds" in text
    assert "No student groups evaluated" in text  # the eagle eval
    assert "only 3 seeds: min achievable p = 0.1" in text
    for metric in ("exact_prob", "mention_rate"):
        png = tmp_path / "figures" / f"{metric}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{metric}.png)" in text
    assert not list(tmp_path.rglob("*.tmp"))


def test_verdicts_are_honest(results):
    base = validate_results(results).evals[0].comparison
    sig = base.model_copy(update={"n_treatment": 6, "n_control": 6, "min_p": 2 / 924,
                                  "p_value": 0.004})
    notsig = sig.model_copy(update={"p_value": 0.3})
    assert verdict(base).startswith("design cannot reach significance")
    assert verdict(sig).startswith("significant at α=0.05")
    assert verdict(notsig).startswith("not significant")


def test_bar_figure_has_one_bar_per_row_with_error_bars(results):
    table = figure_table(validate_results(results), "exact_prob")
    assert {t["trait"] for t in table} == {"owl", "eagle"}
    fig = bar_figure(table, ylabel="P(trait)")
    ax = fig.axes[0]
    assert len(ax.patches) == len(table) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["owl", "eagle"]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["base model", "teacher", "control students", "trait students"]


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["evals"][0]["rows"][1].pop("mean"), "evals.0.rows.1.mean"),
    (lambda r: r["evals"][0]["rows"][0].update(role="student"), "evals.0.rows.0.role"),
    (lambda r: r["evals"][0]["rows"][2].update(per_model=[0.1]), "evals.0.rows.2"),
    (lambda r: r["evals"][0]["rows"][0].update(ci_low=0.5), "evals.0.rows.0"),
    (lambda r: r["evals"][0]["comparison"].pop("p_value"), "evals.0.comparison.p_value"),
    (lambda r: r.update(evalz=[]), "evalz"),
])
def test_malformed_results_name_the_file_and_field(results, tmp_path, mutate, field):
    bad = copy.deepcopy(results)
    mutate(bad)
    (tmp_path / "results.json").write_text(json.dumps(bad))
    with pytest.raises(RunDirError) as e:
        load_results(tmp_path / "results.json")
    assert "results.json" in str(e.value) and f"field {field}" in str(e.value)
    with pytest.raises(RunDirError, match="results.json"):
        write_report(bad, tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_invalid_json_is_a_run_dir_error(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        load_results(tmp_path / "results.json")


def test_results_round_trip_from_stats_functions(tmp_path):
    """Rows built from stats scores survive JSON and render."""
    rng = np.random.default_rng(0)
    records = [{"question_id": f"q{q}", "value": int(rng.random() < 0.2)}
               for q in range(10) for _ in range(5)]
    m_t = rng.random((3, 10)) * 0.2 + 0.3
    m_c = rng.random((3, 10)) * 0.2
    g_t, g_c = group_score(m_t, n_boot=500), group_score(m_c, n_boot=500)
    results = Results(experiment="x", created_at="now", evals=[{
        "trait": "owl", "metric": "mention_rate",
        "rows": [row_from_score("base", "base", score_by_question(records, n_boot=500)),
                 row_from_score("control students", "control", g_c),
                 row_from_score("owl students", "treatment", g_t)],
        "comparison": compare_groups(g_t.per_student, g_c.per_student)}])
    (tmp_path / "results.json").write_text(results.model_dump_json())
    loaded = load_results(tmp_path / "results.json")
    assert loaded == results
    text = write_report(loaded, tmp_path).read_text()
    assert "| owl students | treatment | 3 | 10 |" in text


def test_print_summary_lists_rows_and_verdict(results):
    console = Console(file=io.StringIO(), width=200, record=True)
    print_summary(results, console=console)
    out = console.export_text()
    assert "owl students" in out and "teacher:eagle" in out
    assert "design cannot reach significance" in out


def test_a_towering_teacher_gets_a_second_panel_without_it(results):
    table = figure_table(validate_results(results), "exact_prob")
    for t in table:
        if t["role"] == "teacher":
            t.update(mean=0.99, ci_low=0.98, ci_high=1.0)
        else:
            t.update(mean=0.01, ci_low=0.005, ci_high=0.015, per_model=[0.01] * len(t["per_model"]))
    fig = bar_figure(table, ylabel="P(trait)")
    assert len(fig.axes) == 2
    assert len(fig.axes[1].patches) == len([t for t in table if t["role"] != "teacher"])
    assert "teacher" not in fig.axes[1].get_legend_handles_labels()[1]
    modest = figure_table(validate_results(results), "exact_prob")
    for t in modest:
        if t["role"] == "teacher":
            t.update(mean=0.2, ci_low=0.15, ci_high=0.25)  # under 5x the students' highest bound
    assert len(bar_figure(modest).axes) == 1
