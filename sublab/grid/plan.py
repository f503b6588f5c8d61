"""What a grid will do before it does it: cells, fine-tuned teachers (shared ones once), students, evaluated
models, which cells are already finished, and an estimated cost from rates measured on this project's
2-core machine (`sublab grid GRID.yaml --dry-run`; the rates and what they were measured on:
`sublab.plan.RATES_S`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from sublab import design
from sublab.config import ExperimentConfig, FinetuneConfig, dump
from sublab.grid.cells import Cell, Grid
from sublab.plan import MEASURED_MODEL, evaluated_count, run_seconds, teacher_seconds
from sublab.rundir import read_json, sha256_file

@dataclass
class CellPlan:
    """One cell in the plan."""

    name: str
    values: dict[str, Any]
    teachers: list[str]
    students: int
    models_evaluated: int
    done: bool
    cost_s: float | None
    """Estimated seconds without its fine-tuned teachers (they are counted once per grid); None: no rate."""


@dataclass
class GridPlan:
    """The whole plan of a grid."""

    grid: str
    directory: str
    cells: list[CellPlan]
    finetuned_teachers: int
    """Distinct fine-tuned teachers across cells (each built once, then cached)."""
    teacher_mentions: int
    """Fine-tuned teachers named by all cells together."""
    students: int
    teacher_cost_s: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def to_run(self) -> list[CellPlan]:
        return [c for c in self.cells if not c.done]

    @property
    def cost_s(self) -> float | None:
        """Estimated seconds of the cells still to run plus the teachers, one after another."""
        costs = [c.cost_s for c in self.to_run]
        if self.teacher_cost_s is None or any(c is None for c in costs):
            return None
        return self.teacher_cost_s + sum(c for c in costs if c is not None)


def plan_grid(grid: Grid) -> GridPlan:
    """The plan of a loaded grid (nothing runs, nothing is written)."""
    teachers: dict[str, float | None] = {}
    mentions = 0
    cells = []
    for cell in grid.cells:
        cfg = cell.cfg
        for t in cfg.teachers:
            if t.kind_spec.weights == "finetuned":
                mentions += 1
                teachers.setdefault(teacher_key(cfg, t.name), teacher_seconds(cfg, t.finetune or FinetuneConfig()))
        n_students = sum(1 for _ in design.students(cfg))
        n_models = evaluated_count(cfg)
        cells.append(CellPlan(cell.name, cell.values, [t.name for t in cfg.teachers], n_students, n_models,
                              cell_is_done(cell), run_seconds(cfg, n_models)))
    done_keys = set()  # a finished cell's teachers are in the cache already
    for cell, cp in zip(grid.cells, cells):
        if cp.done:
            done_keys |= {teacher_key(cell.cfg, t.name) for t in cell.cfg.teachers}
    costs = [c for k, c in teachers.items() if k not in done_keys]
    notes = []
    if any(c.cost_s is None for c in cells) or None in costs:
        notes.append(f"no measured rate for this base model or device (rates: {MEASURED_MODEL} on 2 CPU "
                     "cores, docs/scale.md); cost not estimated")
    return GridPlan(grid.name, str(grid.directory), cells, len(teachers), mentions,
                    sum(c.students for c in cells), None if None in costs else sum(c for c in costs if c), notes)


def teacher_key(cfg: ExperimentConfig, teacher: str) -> str:
    """What makes two cells' teachers the same cache entry, from the config alone (the cache's own key
    also hashes the base weights and data bytes, which the config determines)."""
    t = next(t for t in cfg.teachers if t.name == teacher)
    body = t.model_dump(mode="json", exclude={"name"})
    return json.dumps({"base": cfg.base_model, "teacher": body}, sort_keys=True)


def cell_is_done(cell: Cell) -> bool:
    """The cell finished with this very config and nothing was rerun since: its manifest.json records the
    config, results.json is not newer than it, and the datasets it recorded still have their sha256.
    (A cheap check, so finished cells cost no task; `sublab run` on the cell file re-verifies every stage.)"""
    run_dir = cell.cfg.run_dir
    manifest, results = run_dir / "manifest.json", run_dir / "results.json"
    if not (manifest.is_file() and results.is_file() and (run_dir / "report.md").is_file()):
        return False
    try:
        m = read_json(manifest)
    except Exception:  # noqa: BLE001 - unreadable means not done; the task rewrites it
        return False
    if not isinstance(m, dict) or m.get("config") != dump(cell.cfg):
        return False
    if results.stat().st_mtime_ns > manifest.stat().st_mtime_ns:
        return False
    for slot in (s for t in cell.cfg.teachers for s in design.data_slots(cell.cfg, t.name)):
        digest = (m.get("datasets_sha256") or {}).get(slot.label)
        if digest is None or not slot.dataset.is_file() or sha256_file(slot.dataset) != digest:
            return False
    return True


def format_duration(seconds: float | None) -> str:
    """'1 h 05 min', '12 min', '40 s'; '?' when unknown."""
    if seconds is None or math.isnan(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def plan_table(plan: GridPlan) -> tuple[Any, str]:
    """The plan as a rich table (one row per cell) and a summary line."""
    from rich.table import Table

    table = Table(title=f"grid {plan.grid} → {plan.directory}")
    axes = list(plan.cells[0].values) if plan.cells else []
    for col in ["cell", *axes, "teachers", "students", "models evaluated", "status", "est. cost"]:
        table.add_column(col)
    for c in plan.cells:
        table.add_row(c.name, *(json.dumps(c.values[a], default=str) for a in axes), ", ".join(c.teachers),
                      str(c.students), str(c.models_evaluated), "finished" if c.done else "to run",
                      "—" if c.done else format_duration(c.cost_s))
    summary = (f"{len(plan.cells)} cells ({len(plan.to_run)} to run), {plan.finetuned_teachers} fine-tuned "
               f"teachers to build or reuse (named {plan.teacher_mentions} times; shared ones once), "
               f"{plan.students} students; estimated cost {format_duration(plan.cost_s)} on 2 CPU cores, one "
               "cell after another (divide by the cells running at once, given the cores)")
    return table, "\n".join([summary, *plan.notes])
