"""The grid's results across cells: reads each cell's `results.json` (`sublab.report.Results`), writes
`<grid>/grid_results.json`, `<grid>/grid_report.md` and `<grid>/figures/grid_diffs.png`.

One row per cell × trait × metric: the cell's axis values, treatment and control means, their difference
with its CI, the test's p, the treatment / control ratio and the trait's rank among every candidate by
that ratio (when the metric scores several), and the cell's own report. With `pool:`, also one row per
pooled group (its cells' students as one study; `sublab.grid.pool` writes its results and report).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from sublab.grid.cells import POOLED_DIR, Grid
from sublab.grid.pool import pool_groups, write_pooled
from sublab.report import fmt_num, load_results, md_cell
from sublab.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1


def grid_rows(grid: Grid) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of every cell that has results, then of every pooled group whose cells all have them (writing
    its results), and the names of the cells that have none yet."""
    rows, missing = [], []
    for cell in grid.cells:
        path = cell.cfg.run_dir / "results.json"
        if path.is_file():
            rows += _rows(grid, cell.name, cell.values, path)
        else:
            missing.append(cell.name)
    for group in pool_groups(grid):
        if (path := write_pooled(grid, group)) is not None:
            rows += _rows(grid, f"{POOLED_DIR}/{group.name}", group.values, path)
    return rows, missing


def _rows(grid: Grid, name: str, values: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """One row per trait × metric of one results.json (a cell's or a pooled group's)."""
    rows = []
    for ev in load_results(path).evals:
        c = ev.comparison
        spec = [s.candidate for s in ev.specificity]
        rows.append({
            "cell": name, "axes": values, "trait": ev.trait, "metric": ev.metric,
            "treatment": c.treatment_mean if c else None, "control": c.control_mean if c else None,
            "diff": c.diff if c else None, "ci_low": c.ci_low if c else None, "ci_high": c.ci_high if c else None,
            "p_value": c.p_value if c else None, "test": c.test if c else None,
            "n_treatment": c.n_treatment if c else None, "n_control": c.n_control if c else None,
            "ratio": c.treatment_mean / c.control_mean if c and c.control_mean > 0 else None,
            "rank": spec.index(ev.trait) + 1 if ev.trait in spec else None,
            "candidates": len(spec) or None,
            "report": (path.parent / "report.md").relative_to(grid.directory).as_posix(),
        })
    return rows


def write_grid_results(grid: Grid) -> Path:
    """Write grid_results.json, grid_report.md and the figure; returns the report's path."""
    rows, missing = grid_rows(grid)
    axes = [a.name for a in grid.axes]
    atomic_write_json(grid.directory / "grid_results.json", {
        "schema_version": SCHEMA_VERSION, "grid": grid.name, "grid_file": str(grid.path),
        "experiment": grid.spec.experiment, "axes": axes, "cells": [c.name for c in grid.cells],
        "pooled": grid.spec.pool, "missing": missing, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows})
    figure = _write_figure(grid, rows)
    path = grid.directory / "grid_report.md"
    atomic_write_text(path, grid_markdown(grid, rows, missing, figure))
    return path


def grid_markdown(grid: Grid, rows: list[dict[str, Any]], missing: list[str], figure: str | None) -> str:
    """The report: one table of every cell × trait × metric, axis values as columns."""
    axes = [a.name for a in grid.axes]
    head = ["cell", *axes, "trait", "metric", "n (T/C)", "treatment", "control", "diff", "95% CI", "p",
            "ratio", "rank", "report"]
    lines = [f"# Grid {grid.name}", "",
             f"`{grid.spec.experiment}` × {' × '.join(f'`{a}`' for a in axes)}: {len(grid.cells)} cells, "
             f"{len(grid.cells) - len(missing)} with results. Treatment vs control students of each cell "
             "(its own report has the details); ratio = treatment / control mean, rank = the trait's rank "
             "among every candidate by that ratio.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = f"[{fmt_num(r['ci_low'], True)}, {fmt_num(r['ci_high'], True)}]" if r["ci_low"] is not None else "—"
        rank = f"{r['rank']} of {r['candidates']}" if r["rank"] else "—"
        n = f"{r['n_treatment']}/{r['n_control']}" if r["n_treatment"] is not None else "—"
        cells = [r["cell"], *(_value(r["axes"].get(a)) for a in axes), r["trait"], r["metric"], n,
                 fmt_num(r["treatment"]), fmt_num(r["control"]), fmt_num(r["diff"], True), ci,
                 "—" if r["p_value"] is None else f"{r['p_value']:.3g}",
                 "—" if r["ratio"] is None else f"×{r['ratio']:.3f}", rank, f"[report]({r['report']})"]
        lines.append("| " + " | ".join(md_cell(str(c)) for c in cells) + " |")
    if missing:
        lines += ["", f"No results yet (failed or not run): {', '.join(missing)}. Rerun the grid to finish them."]
    if figure:
        lines += ["", f"![treatment − control per cell]({figure})"]
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    return "—" if v is None else str(v)


def _write_figure(grid: Grid, rows: list[dict[str, Any]]) -> str | None:
    """Per metric: each cell's treatment − control difference with its CI, one colour per trait."""
    rows = [r for r in rows if r["diff"] is not None]
    if not rows:
        return None
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    traits = list(dict.fromkeys(r["trait"] for r in rows))
    cells = list(dict.fromkeys([c.name for c in grid.cells] + [r["cell"] for r in rows]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.4 * len(cells) * len(traits) + 1.5),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for j, trait in enumerate(traits):
            for r in (r for r in rows if r["metric"] == metric and r["trait"] == trait):
                y = cells.index(r["cell"]) + (j - (len(traits) - 1) / 2) * 0.8 / max(1, len(traits))
                err = ([[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]]
                       if r["ci_low"] is not None else None)
                ax.errorbar(r["diff"], y, xerr=err, fmt="o", color=f"C{j}", ms=4,
                            label=trait if r["cell"] == next(x["cell"] for x in rows if x["trait"] == trait
                                                             and x["metric"] == metric) else None)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_yticks(range(len(cells)), cells, fontsize=7)
        ax.set_xlabel("treatment − control (95% CI)")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    name = "figures/grid_diffs.png"
    atomic_write_bytes(grid.directory / name, buf.getvalue())
    return name
