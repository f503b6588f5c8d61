"""Pooled results: the cells of a pooled axis (`pool:` in the grid file) are seed blocks of one study, so
their students are pooled back into that study's comparison — the same `sublab.results` code a single
`sublab run` of all the seeds would use, reading each student's eval file from the cell that trained it.

    axes:
      seeds: {s0: {train.seeds: [0]}, s1: {train.seeds: [1]}, s2: {train.seeds: [2]}}
    pool: [seeds]

Cells that agree on every other axis form one group; each group gets `<grid>/pooled/<group>/results.json`
and `report.md` (the within-block test over all its seeds, specificity, per-student table), and a row
per trait and metric in the grid's table. Base and teacher rows come from the group's first cell: they
do not depend on the seed, and each cell evaluates them from the same cached weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sublab.config import ExperimentConfig
from sublab.grid.cells import POOLED_DIR, Cell, Grid
from sublab.report import write_report
from sublab.results import EvalScores, results_for
from sublab.rundir import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class PoolGroup:
    """Cells that differ only in pooled axes, and the study they make together."""

    name: str
    values: dict[str, object]
    """The other axes' values (the pooled ones read 'pooled')."""
    cells: list[Cell]

    @property
    def seeds(self) -> list[int]:
        return [s for c in self.cells for s in c.cfg.train.seeds]


class _PooledScores(EvalScores):
    """A student's eval file from the cell that trained it; base and teachers from the first cell."""

    def __init__(self, cfg: ExperimentConfig, cells: list[Cell]):
        super().__init__(cfg)
        self.cells = cells

    def path(self, model: str, variant: str) -> Path:
        for cell in self.cells:
            candidate = cell.cfg.run_dir / "evals" / model / f"{variant}.jsonl"
            if candidate.exists():
                return candidate
        return self.cells[0].cfg.run_dir / "evals" / model / f"{variant}.jsonl"


def pool_groups(grid: Grid) -> list[PoolGroup]:
    """The grid's cells grouped by every axis that is not pooled (none when nothing is pooled)."""
    if not grid.spec.pool:
        return []
    groups: dict[tuple, PoolGroup] = {}
    for cell in grid.cells:
        kept = {a: v for a, v in cell.values.items() if a not in grid.spec.pool}
        key = tuple(str(v) for v in kept.values())
        name = "__".join(f"{a.split('.')[-1]}-{v}" for a, v in kept.items()) or "all"
        values = {a: ("pooled" if a in grid.spec.pool else v) for a, v in cell.values.items()}
        groups.setdefault(key, PoolGroup(name, values, [])).cells.append(cell)
    return list(groups.values())


def pooled_config(group: PoolGroup, grid: Grid) -> ExperimentConfig:
    """The first cell's config with every seed of the group, named after the group, under `pooled/`."""
    first = group.cells[0].cfg
    return first.model_copy(update={"name": group.name, "runs_dir": str(grid.directory / POOLED_DIR),
                                    "train": first.train.model_copy(update={"seeds": group.seeds})})


def write_pooled(grid: Grid, group: PoolGroup) -> Path | None:
    """Write the group's results.json and report.md once every cell has results; returns the results path
    (None while a cell is unfinished)."""
    if not all((c.cfg.run_dir / "results.json").is_file() for c in group.cells):
        return None
    cfg = pooled_config(group, grid)
    results = results_for(cfg, _PooledScores(cfg, group.cells))
    results["notes"] = [f"pooled from the grid's cells {', '.join(c.name for c in group.cells)} "
                        f"(seeds {group.seeds}): each student's evals are read from the cell that trained it",
                        *results["notes"]]
    path = cfg.run_dir / "results.json"
    atomic_write_json(path, results)
    write_report(results, cfg.run_dir)
    log.info("grid %s: pooled %d cells into %s", grid.name, len(group.cells), path)
    return path
