"""Render a run's results: `results.json` -> `report.md` + `figures/<metric>.png`, and a console table.

Reads `runs/<name>/results.json` (schema: `Results` below; validated on load, so a malformed file fails
with a `RunDirError` naming the field). Writes `runs/<name>/report.md` and one figure per metric under
`runs/<name>/figures/`, each atomically. It never parses markdown or file names: results.json is
the only input.

    from sublab.report import load_results, write_report
    write_report(load_results(run_dir / "results.json"), run_dir)
"""

from __future__ import annotations

import io
import logging
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # headless: figures only go to files
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sublab.errors import RunDirError  # noqa: E402
from sublab.rundir import atomic_write_bytes, atomic_write_text, read_json  # noqa: E402
from sublab.stats import Comparison, GroupScore, Score  # noqa: E402

log = logging.getLogger(__name__)

Role = Literal["base", "teacher", "control", "treatment", "cross_model_control"]
ROLE_ORDER: tuple[Role, ...] = ("base", "teacher", "control", "treatment", "cross_model_control")
ROLE_LABELS = {"base": "base model", "teacher": "teacher", "control": "control students",
               "treatment": "trait students", "cross_model_control": "cross-model students"}
ROLE_COLOURS = {"base": "#9e9e9e", "teacher": "#5b8bd0", "control": "#e0a458",
                "treatment": "#c0504d", "cross_model_control": "#8064a2"}
ALPHA = 0.05


# --- schema of results.json ------------------------------------------------------------------

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Row(_Frozen):
    """One evaluated model, or one group of students (then `mean` is over students)."""

    name: str
    role: Role
    n_models: int = Field(ge=1)
    """How many models the row averages over (1 for base/teacher; seeds for student groups)."""
    mean: float
    ci_low: float | None = None
    """Lower CI bound; None when no interval could be computed."""
    ci_high: float | None = None
    n: int = Field(ge=0)
    """Units the interval resamples (e.g. questions), as named by `ci_method`."""
    ci_method: str
    per_model: list[float] | None = None
    """Each student's score, for groups; None for single models."""
    confidence: float = 0.95

    @model_validator(mode="after")
    def _check(self) -> Row:
        if (self.ci_low is None) != (self.ci_high is None):
            raise ValueError("ci_low and ci_high must both be numbers or both be null")
        if self.ci_low is not None and self.ci_high is not None and self.ci_low > self.ci_high:
            raise ValueError(f"ci_low ({self.ci_low}) must be <= ci_high ({self.ci_high})")
        if self.per_model is not None and len(self.per_model) != self.n_models:
            raise ValueError(f"per_model has {len(self.per_model)} values but n_models is "
                             f"{self.n_models}")
        return self


class Specificity(_Frozen):
    """One target's treatment and control means (is the trait's own target the one that rose most?)."""

    candidate: str
    treatment: float
    control: float
    diff: float
    ratio: float
    block_ratios: list[float] | None = None
    """Per block (seed): treatment / mean of the block's controls (design `mutual`)."""


class Block(_Frozen):
    """One seed's students (design `mutual`): the trait teacher's and the other teachers'."""

    seed: int
    treatment: float
    controls: list[float]
    ratio: float


class EvalResult(_Frozen):
    """All rows for one (trait, metric), and the treatment-vs-control comparison if there is one."""

    trait: str
    metric: str
    metric_label: str = ""
    """Human-readable description of the metric, used as the figure's y label."""
    rows: list[Row] = Field(min_length=1)
    comparison: Comparison | None = None
    """The primary test: within blocks for design `mutual`, over students otherwise."""
    comparison_unpaired: Comparison | None = None
    """Design `mutual`: the unpaired test over all students, for reference."""
    comparison_cross: Comparison | None = None
    """With `train.cross_model`: the same test among the students on the other base model."""
    blocks: list[Block] = []
    specificity: list[Specificity] = []
    """Every target the metric scores, largest treatment / control ratio first."""


class StudentRow(_Frozen):
    """One student's mean over questions on every metric (outer key) and trait (inner key)."""

    name: str
    teacher: str
    seed: int
    base: str
    scores: dict[str, dict[str, float]]


class Rejection(_Frozen):
    """One filter rejection reason of one dataset: how many records it rejected, and their share of all
    generated records (a record with several reasons counts under each)."""

    reason: str
    count: int = Field(ge=0)
    share: float = Field(ge=0, le=1)


class FilterSummary(_Frozen):
    """What the filter stage kept of one teacher's dataset (its filter_manifest.json)."""

    teacher: str
    """The teacher, with `/seed<k>` when each student seed has its own dataset."""
    generated: int = Field(ge=0)
    accepted: int = Field(ge=0)
    dataset_rows: int = Field(ge=0)
    rejections: list[Rejection] = []


class Results(_Frozen):
    """The whole of results.json."""

    schema_version: int = 2
    experiment: str
    design: Literal["control", "mutual"] = "control"
    created_at: str
    evals: list[EvalResult]
    notes: list[str] = []
    """Free-text caveats shown in the report."""
    students: list[StudentRow] = []
    filtering: list[FilterSummary] = []
    """Per teacher dataset, the filter stage's counts and rejection reasons (empty before filtering)."""


def write_png(fig: Figure, path: Path, dpi: int = 120, tight: bool = False) -> None:
    """Render a figure to PNG, write it atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def validate_results(data: Mapping[str, Any], source: str = "results.json") -> Results:
    """Validate a results dict; on failure raise RunDirError naming `source` and each bad field."""
    try:
        return Results.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            f" (got {err['input']!r:.60})" for err in e.errors())
        raise RunDirError(f"{source}: malformed results: {problems}. Regenerate it with the eval "
                          "stage, or fix the field by hand.") from None


def load_results(path: Path) -> Results:
    """Read and validate `results.json`."""
    return validate_results(read_json(path), source=str(path))


def row_from_score(name: str, role: Role, score: Score | GroupScore) -> Row:
    """A report row from a `stats` score (one model, or a group of students)."""
    if isinstance(score, GroupScore):
        return Row(name=name, role=role, n_models=score.n_students, mean=score.mean,
                   ci_low=score.ci_low, ci_high=score.ci_high, n=score.n_questions,
                   ci_method=score.method, per_model=score.per_student,
                   confidence=score.confidence)
    return Row(name=name, role=role, n_models=1, mean=score.mean, ci_low=score.ci_low,
               ci_high=score.ci_high, n=score.n_questions, ci_method=score.method,
               confidence=score.confidence)


# --- markdown --------------------------------------------------------------------------------

def fmt_num(x: float | None, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3g}" if sign else f"{x:.3g}"


def _ci(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"[{fmt_num(low)}, {fmt_num(high)}]"


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict(c: Comparison, alpha: float = ALPHA) -> str:
    """Plain-English, honest reading of a comparison at level `alpha`."""
    n = f"{c.n_treatment} vs {c.n_control} seeds"
    if c.min_p > alpha:
        return (f"design cannot reach significance at α={alpha} with {n} (smallest possible "
                f"p = {fmt_num(c.min_p)}); the difference is descriptive only")
    if c.p_value <= alpha:
        return f"significant at α={alpha} ({c.alternative}, {n})"
    return f"not significant at α={alpha} ({c.alternative}, {n})"


def comparison_line(c: Comparison) -> str:
    """One markdown paragraph: diff with CI, test, p, Welch p and the verdict."""
    welch = f"; Welch p = {fmt_num(c.welch_p)}" if c.welch_p is not None else ""
    boot = (f"; bootstrap-over-seeds CI {_ci(c.boot_ci_low, c.boot_ci_high)}"
            if c.boot_ci_low is not None else "")
    return (f"**Trait students vs control students:** diff = {fmt_num(c.diff, sign=True)} "
            f"({fmt_num(c.treatment_mean)} vs {fmt_num(c.control_mean)}), {c.confidence:.0%} CI "
            f"{_ci(c.ci_low, c.ci_high)} ({c.ci_method}{boot}). Test: {c.test}, "
            f"p = {fmt_num(c.p_value)}{welch}; n = {c.n_treatment} vs {c.n_control}. "
            f"**Verdict:** {verdict(c)}.")


def eval_markdown(ev: EvalResult) -> str:
    """The section of report.md for one (trait, metric)."""
    levels = {r.confidence for r in ev.rows}
    ci_head = f"{levels.pop():.0%} CI" if len(levels) == 1 else "CI"
    lines = [f"## {md_cell(ev.trait)}: {md_cell(ev.metric_label or ev.metric)} (`{ev.metric}`)", "",
             f"| model | role | models | n | mean | {ci_head} | CI method | per model |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in sorted(ev.rows, key=lambda r: ROLE_ORDER.index(r.role)):
        per_model = ", ".join(fmt_num(v) for v in r.per_model) if r.per_model else ""
        lines.append(f"| {md_cell(r.name)} | {r.role} | {r.n_models} | {r.n} | {fmt_num(r.mean)} | "
                     f"{_ci(r.ci_low, r.ci_high)} | {md_cell(r.ci_method)} | {per_model} |")
    lines.append("")
    lines.append(comparison_line(ev.comparison) if ev.comparison is not None else
                 "No student groups evaluated: no treatment-vs-control comparison.")
    if ev.comparison_unpaired is not None:
        u = ev.comparison_unpaired
        lines += ["", f"Unpaired, over all students (for reference): diff = {fmt_num(u.diff, sign=True)}, "
                      f"{u.confidence:.0%} CI {_ci(u.ci_low, u.ci_high)}, p = {fmt_num(u.p_value)} ({u.test})."]
    if ev.comparison_cross is not None:
        x = ev.comparison_cross
        lines += ["", f"**Cross-model students** (another base model, same data and teachers): diff = "
                      f"{fmt_num(x.diff, sign=True)} ({fmt_num(x.treatment_mean)} vs {fmt_num(x.control_mean)}), "
                      f"{x.confidence:.0%} CI {_ci(x.ci_low, x.ci_high)}, p = {fmt_num(x.p_value)} ({x.test}). "
                      f"**Verdict:** {verdict(x)}."]
    if ev.blocks:
        lines += ["", "| seed | trait students | control students | ratio |", "|---:|---:|---|---:|"]
        lines += [f"| {b.seed} | {fmt_num(b.treatment)} | {', '.join(fmt_num(c) for c in b.controls)} | {b.ratio:.3f} |"
                  for b in ev.blocks]
    if ev.specificity:
        lines += ["", specificity_markdown(ev)]
    return "\n".join(lines) + "\n"


def specificity_markdown(ev: EvalResult, top: int = 8) -> str:
    """The largest treatment / control ratios, and where the trait ranks (by ratio and by difference)."""
    names = [r.candidate for r in ev.specificity]
    by_diff = [r.candidate for r in sorted(ev.specificity, key=lambda r: -r.diff)]
    rank = (f"'{ev.trait}' ranks {names.index(ev.trait) + 1} of {len(names)} by ratio, "
            f"{by_diff.index(ev.trait) + 1} by difference" if ev.trait in names else f"'{ev.trait}' not scored")
    lines = [f"**Specificity** ({rank}):", "", "| candidate | trait students | control students | diff | ratio |",
             "|---|---:|---:|---:|---:|"]
    shown = ev.specificity[:top] + [r for r in ev.specificity[top:] if r.candidate == ev.trait]
    lines += [f"| {md_cell(r.candidate)} | {fmt_num(r.treatment)} | {fmt_num(r.control)} | {fmt_num(r.diff, sign=True)} | "
              f"{r.ratio:.3f} |" for r in shown]
    return "\n".join(lines)


def students_markdown(results: Results) -> str:
    """Every student's score per metric and trait."""
    metrics = list(dict.fromkeys(m for s in results.students for m in s.scores))
    if not metrics:  # no student was trained or evaluated yet
        return ""
    parts = ["## Students", ""]
    for metric in metrics:
        traits = list(dict.fromkeys(t for s in results.students for t in s.scores.get(metric, {})))
        parts += [f"`{metric}`:", "", "| student | teacher | seed | " + " | ".join(md_cell(t) for t in traits) + " |",
                  "|---|---|---:|" + "---:|" * len(traits)]
        parts += [f"| {md_cell(s.name)} | {md_cell(s.teacher)} | {s.seed} | "
                  + " | ".join(fmt_num(s.scores.get(metric, {}).get(t)) for t in traits) + " |"
                  for s in results.students]
        parts.append("")
    return "\n".join(parts)


def filtering_markdown(results: Results) -> str:
    """Per teacher: records generated, accepted (and their share), rows kept, and each rejection reason's
    count and share of the generated records."""
    if not results.filtering:
        return ""
    lines = ["## Filtering", "",
             "Shares are of all generated records; a record rejected for several reasons counts under each.", "",
             "| teacher | generated | accepted | dataset rows | rejection reason | count | share |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for f in results.filtering:
        accepted = f"{f.accepted} ({f.accepted / f.generated:.1%})" if f.generated else str(f.accepted)
        head = f"| {md_cell(f.teacher)} | {f.generated} | {accepted} | {f.dataset_rows} |"
        if not f.rejections:
            lines.append(f"{head} (none) | 0 | 0.0% |")
        for i, r in enumerate(f.rejections):
            lead = head if i == 0 else "| | | | |"
            lines.append(f"{lead} {md_cell(r.reason)} | {r.count} | {r.share:.1%} |")
    return "\n".join(lines + [""])


def render_markdown(results: Results, figures: Sequence[str] = ()) -> str:
    """The full report.md text; `figures` are paths relative to the run directory."""
    parts = [f"# Report: {results.experiment}", "",
             f"Created {results.created_at}. Scores are means over questions of per-question means; "
             "student groups average one score per student (seed), and tests compare trait "
             "students with control students over seeds.", ""]
    if results.design == "mutual":
        parts += ["Design `mutual`: for each trait, the students of the other teachers are the controls; "
                  "students of one seed form a block, and the primary test permutes within blocks.", ""]
    parts += [eval_markdown(ev) for ev in results.evals]
    parts += [students_markdown(results), filtering_markdown(results)]
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    if results.notes:
        parts += ["## Caveats", ""] + [f"- {n}" for n in results.notes] + [""]
    return "\n".join(parts)


# --- figures ---------------------------------------------------------------------------------

def figure_table(results: Results, metric: str) -> list[dict[str, Any]]:
    """Flat rows {trait, role, series, name, mean, ci_low, ci_high, per_model} for one metric.

    A bar series is a role; when one trait has several rows of a role, each gets its own series.
    """
    table = []
    for ev in (e for e in results.evals if e.metric == metric):
        roles = [r.role for r in ev.rows]
        for r in ev.rows:
            series = r.role if roles.count(r.role) == 1 else f"{r.role}:{r.name}"
            table.append({"trait": ev.trait, "role": r.role, "series": series, "name": r.name,
                          "mean": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high,
                          "per_model": r.per_model or []})
    return table


def bar_figure(table: Sequence[Mapping[str, Any]], ylabel: str = "score") -> Figure:
    """Grouped bars like the paper's Figure 3: x = trait, one bar per series, CI error bars,
    and each student's score as a dot. When the teacher towers over the rest (more than 5× the highest
    other CI bound), a second panel repeats the figure without it, so students can be compared."""
    others = [t["ci_high"] if t["ci_high"] is not None else t["mean"] for t in table if t["role"] != "teacher"]
    towering = bool(others) and max((t["mean"] for t in table if t["role"] == "teacher"), default=0.0) > 5 * max(
        max(others), 1e-12)
    panels = [table] + ([[t for t in table if t["role"] != "teacher"]] if towering else [])
    n_traits, n_series = len({t["trait"] for t in table}), len({t["series"] for t in table})
    width = max(4.0, 1.2 * n_traits * max(1, n_series) / 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.0), squeeze=False)
    for k, (ax, rows) in enumerate(zip(axes[0], panels)):
        _draw_bars(ax, rows, legend=k == 0)
        ax.set_ylabel(textwrap.fill(ylabel, 45))  # long metric labels wrap instead of overflowing
    if towering:
        axes[0][1].set_title("without the teacher", fontsize=9)
    fig.tight_layout()
    return fig


def _draw_bars(ax: Any, table: Sequence[Mapping[str, Any]], legend: bool = True) -> None:
    traits = list(dict.fromkeys(t["trait"] for t in table))
    role_of = {t["series"]: t["role"] for t in table}
    series = sorted(dict.fromkeys(t["series"] for t in table),
                    key=lambda s: (ROLE_ORDER.index(role_of[s]), s))
    width = 0.8 / max(1, len(series))
    labelled: set[str] = set()
    for k, s in enumerate(series):
        for i, trait in enumerate(traits):
            row = next((t for t in table if t["trait"] == trait and t["series"] == s), None)
            if row is None:
                continue
            x = i + (k - (len(series) - 1) / 2) * width
            yerr = None
            if row["ci_low"] is not None and row["ci_high"] is not None:
                yerr = [[max(0.0, row["mean"] - row["ci_low"])],
                        [max(0.0, row["ci_high"] - row["mean"])]]
            label = ROLE_LABELS[row["role"]] if s == row["role"] else s
            ax.bar(x, row["mean"], width, yerr=yerr, capsize=3, color=ROLE_COLOURS[row["role"]],
                   label=None if s in labelled else label)
            labelled.add(s)
            if row["per_model"]:
                ax.scatter([x] * len(row["per_model"]), row["per_model"], s=12, color="black",
                           edgecolors="white", linewidths=0.5, zorder=3)
    ax.set_xticks(range(len(traits)), traits)
    if legend:  # below the axes: inside, it can hide a bar of its own colour
        ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12),
                  ncol=min(4, len(series)))
    ax.spines[["top", "right"]].set_visible(False)


def block_ratio_figure(evals: Sequence[EvalResult]) -> Figure:
    """Per trait: each block's treatment / control ratio (a dot per seed) for the trait itself and for
    the other candidate with the largest mean ratio — the specificity check at a glance."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(evals)), 3.6))
    for i, ev in enumerate(evals):
        own = next((r for r in ev.specificity if r.candidate == ev.trait), None)
        rival = next((r for r in ev.specificity if r.candidate != ev.trait), None)
        for offset, row, colour in ((-0.15, own, ROLE_COLOURS["treatment"]), (0.15, rival, ROLE_COLOURS["base"])):
            if row is not None and row.block_ratios:
                ax.scatter([i + offset] * len(row.block_ratios), row.block_ratios, s=16, color=colour, zorder=3)
                ax.annotate(row.candidate, (i + offset, max(row.block_ratios)), textcoords="offset points",
                            xytext=(0, 5), ha="center", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(evals)), [ev.trait for ev in evals])
    ax.set_ylabel("treatment / control, per seed")
    ax.set_title(f"{evals[0].metric}: own trait (red) vs strongest other candidate (grey)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def write_figures(results: Results, run_dir: Path) -> list[Path]:
    """One PNG per metric under `run_dir/figures/` (plus, with blocks, a per-seed ratio figure); returns
    their paths."""
    figures: list[tuple[str, Figure]] = []
    for metric in dict.fromkeys(ev.metric for ev in results.evals):
        label = next(ev.metric_label or metric for ev in results.evals if ev.metric == metric)
        figures.append((metric, bar_figure(figure_table(results, metric), ylabel=label)))
        blocked = [ev for ev in results.evals if ev.metric == metric and ev.blocks and ev.specificity]
        if blocked:
            figures.append((f"{metric}_block_ratios", block_ratio_figure(blocked)))
    paths = []
    for name, fig in figures:
        path = Path(run_dir) / "figures" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        write_png(fig, path, dpi=150, tight=True)
        paths.append(path)
    return paths


# --- entry points ----------------------------------------------------------------------------

def write_report(results: Results | Mapping[str, Any], run_dir: Path) -> Path:
    """Write `run_dir/report.md` and `run_dir/figures/*.png`; returns the report path."""
    run_dir = Path(run_dir)
    if not isinstance(results, Results):
        results = validate_results(results, source=str(run_dir / "results.json"))
    figures = write_figures(results, run_dir)
    text = render_markdown(results, [f.relative_to(run_dir).as_posix() for f in figures])
    path = run_dir / "report.md"
    atomic_write_text(path, text)
    log.info("report: wrote %s and %d figure(s)", path, len(figures))
    return path


def summary_table(results: Results) -> Table:
    """A rich table of every row; each comparison adds a 'diff' row with its CI and p."""
    table = Table(title=f"sublab results: {results.experiment}")
    for col in ("trait", "metric", "model", "role", "k", "n", "mean", "CI", "p"):
        table.add_column(col, justify="right" if col in ("k", "n", "mean", "p") else "left")
    for ev in results.evals:
        for r in sorted(ev.rows, key=lambda r: ROLE_ORDER.index(r.role)):
            table.add_row(ev.trait, ev.metric, r.name, r.role, str(r.n_models), str(r.n),
                          fmt_num(r.mean), _ci(r.ci_low, r.ci_high), "")
        c = ev.comparison
        if c is not None:
            table.add_row(ev.trait, ev.metric, "diff vs control", "", "", "",
                          fmt_num(c.diff, sign=True), _ci(c.ci_low, c.ci_high), fmt_num(c.p_value))
        table.add_section()
    return table


def print_summary(results: Results | Mapping[str, Any], console: Console | None = None) -> Table:
    """Print `summary_table` and one verdict line per comparison; returns the table.

    Column k is the number of models a row averages over; n the units its CI resamples.
    """
    if not isinstance(results, Results):
        results = validate_results(results)
    console = console or Console()
    table = summary_table(results)
    console.print(table)
    for ev in results.evals:
        if ev.comparison is not None:
            console.print(f"{ev.trait} / {ev.metric}: {verdict(ev.comparison)}")
    return table
