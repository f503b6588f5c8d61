"""A grid file and its cells: a base experiment × axes → one ordinary experiment file per cell.

Reads GRID.yaml and the experiment file it names (`experiment:`, relative to the grid file; `extends:`
chains and presets resolve as for `sublab run`). Writes `<runs_dir>/<grid>/cells/<cell>.yaml`, each a
complete experiment file whose `runs_dir` is the grid's directory, so its run directory is
`<runs_dir>/<grid>/<cell>/` and `sublab run <cell>.yaml` reruns it alone.

    name: lr-sweep                    # the grid's directory under runs_dir (default: the file's stem)
    experiment: ../examples/owl-quick.yaml
    axes:
      train.lr: [3.0e-4, 1.0e-3]      # one config key (list indices as in --set), a list of values
      init:                           # or named variants, each setting several keys
        shared: {}
        other: {train.lora_init_seed: null, train.lora_init_seed_offset: 1000}
    resources: {num_cpus: 1}          # per cell (Ray); num_gpus defaults to 1 when the cell runs on CUDA
    pool: [seeds]                     # axes whose cells are seed blocks of one study (sublab.grid.pool)

The cells are the product of the axes, first axis outermost. Every cell is validated before anything
runs; a bad axis is a one-line ConfigError naming the grid file and the axis.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from sublab.config import (SAFE_NAME, ExperimentConfig, StrictModel, apply_setting, check_runnable, deep_merge,
                           format_validation_error, preset, read_experiment_file, validate_experiment, with_extends)
from sublab.errors import ConfigError
from sublab.rundir import atomic_write_text

CELLS_DIR = "cells"
"""Cell experiment files live in <grid dir>/cells/; no cell may take this name."""
POOLED_DIR = "pooled"
"""Pooled groups' results live in <grid dir>/pooled/<group>/ (`sublab.grid.pool`)."""
RESERVED = {CELLS_DIR, "logs", POOLED_DIR}


class GridResources(StrictModel):
    """What one cell's Ray task declares (and so how many cells share a machine)."""

    num_cpus: float = Field(1, gt=0)
    """CPUs per cell; the cell's torch threads are this, rounded down (at least 1)."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs per cell; None: 1 when the cell's device is cuda (or auto on a cluster with GPUs), else 0."""
    memory_gb: float | None = Field(None, gt=0)
    """Memory Ray reserves per cell, in GiB; None: no reservation."""


class GridFile(StrictModel):
    """The whole grid file."""

    name: str | None = None
    """The grid's directory under runs_dir; None: the grid file's stem."""
    experiment: str
    """The base experiment file, relative to the grid file."""
    runs_dir: str | None = None
    """Where the grid's directory goes; None: the base experiment's runs_dir."""
    axes: dict[str, Any]
    """Per axis: a config key (dotted, list indices allowed) → its values, or an axis name → named
    variants, each a mapping of config keys → values."""
    resources: GridResources = GridResources()
    max_retries: int = Field(2, ge=0)
    """Times Ray reruns a cell whose worker died (the pipeline resumes where it stopped)."""
    pool: list[str] = []
    """Axes that only split `train.seeds`: their cells are seed blocks of one study, and the grid's results
    also pool them into that study's comparison (`sublab.grid.pool`)."""

    @field_validator("name")
    @classmethod
    def _safe(cls, name: str | None) -> str | None:
        if name is not None and not SAFE_NAME.fullmatch(name):
            raise ValueError(f"'{name}' is not a safe directory name (letters, digits, '-', '_', '.')")
        return name


@dataclass(frozen=True)
class Axis:
    """One axis: its name and, per value, a label (for cell names and tables) and the settings it makes."""

    name: str
    labels: list[str]
    settings: list[dict[str, Any]]
    """Per value: dotted key → value."""
    shown: list[Any]
    """Per value: what the grid's tables show (the value itself, or the variant's name)."""


@dataclass
class Cell:
    """One cell: its name, the axis values that define it, its experiment file and validated config."""

    name: str
    values: dict[str, Any]
    """Axis name → the value shown for it."""
    path: Path
    raw: dict[str, Any]
    cfg: ExperimentConfig


@dataclass
class Grid:
    """A loaded grid: its file, settings, directory and validated cells (not yet written)."""

    path: Path
    spec: GridFile
    directory: Path
    axes: list[Axis]
    cells: list[Cell] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.directory.name


def load_grid(path: str | Path) -> Grid:
    """Read a grid file, expand its cells and validate every one. ConfigError names the file and axis."""
    path = Path(path)
    raw = read_experiment_file(path)
    try:
        spec = GridFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
    base_path = (path.parent / spec.experiment)
    if not base_path.is_file():
        raise ConfigError(f"{path}: experiment: {spec.experiment} not found (relative to the grid file: "
                          f"{base_path})")
    base = with_extends(base_path, read_experiment_file(base_path), {base_path.resolve()})
    axes = [_axis(path, name, values) for name, values in spec.axes.items()]
    if not axes:
        raise ConfigError(f"{path}: axes: empty; give at least one axis (e.g. train.lr: [3.0e-4, 1.0e-3])")
    runs_dir = Path(spec.runs_dir if spec.runs_dir is not None else base.get("runs_dir", "runs"))
    grid = Grid(path, spec, (runs_dir / (spec.name or path.stem)).resolve(), axes)
    if not SAFE_NAME.fullmatch(grid.name):
        raise ConfigError(f"{path}: the grid's name '{grid.name}' is not a safe directory name; set `name:`")
    for name, combo in zip(_cell_names(axes), itertools.product(*(range(len(a.labels)) for a in axes))):
        values = {a.name: a.shown[i] for a, i in zip(axes, combo)}
        settings = [a.settings[i] for a, i in zip(axes, combo)]
        try:
            cell_raw, cfg = _cell_config(grid, base, settings, f"{path}: cell {name}", name=name)
        except ConfigError:
            _blame_axis(grid, base, axes, combo)
            raise
        check_runnable(cfg, source=f"{path}: cell {name}")
        grid.cells.append(Cell(name, values, grid.directory / CELLS_DIR / f"{name}.yaml", cell_raw, cfg))
    _check_pool(grid)
    return grid


def _check_pool(grid: Grid) -> None:
    """Each pooled axis must exist and set nothing but `train.seeds`, and the seeds it sets must not
    overlap: then its cells are disjoint seed blocks of one study."""
    names = {a.name: a for a in grid.axes}
    for name in grid.spec.pool:
        where = f"{grid.path}: pool: {name}"
        if name not in names:
            raise ConfigError(f"{where}: no such axis; axes: {', '.join(names)}")
        for label, settings in zip(names[name].labels, names[name].settings):
            if set(settings) != {"train.seeds"}:
                raise ConfigError(f"{where}: value {label} sets {', '.join(settings) or 'nothing'}; a pooled "
                                  "axis may set only train.seeds (its cells must differ in seeds alone)")
        seeds = [s for settings in names[name].settings for s in settings["train.seeds"]]
        if len(seeds) != len(set(seeds)):
            raise ConfigError(f"{where}: its values share seeds ({seeds}); each seed must be in one cell only")


def _blame_axis(grid: Grid, base: dict[str, Any], axes: list[Axis], combo: tuple[int, ...]) -> None:
    """A cell failed validation: if one of its axis values fails on its own, raise naming that axis
    (values that are only invalid together leave the cell's own error to be raised)."""
    for axis, i in zip(axes, combo):
        _cell_config(grid, base, [axis.settings[i]], f"{grid.path}: axis {axis.name}={axis.labels[i]}")


def _axis(path: Path, name: str, values: Any) -> Axis:
    """One axis from the grid file: a key with a list of values, or named variants."""
    where = f"{path}: axis {name}"
    if isinstance(values, list):
        if not values:
            raise ConfigError(f"{where}: no values; list at least one")
        _key_parts(name, where)
        labels = [_label(v) for v in values]
        return Axis(name, labels, [{name: v} for v in values], list(values))
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ConfigError(f"{where}: expected a list of values (for a config key) or a mapping of named "
                          f"variants, each a mapping of config keys to values; got {values!r}")
    if not values:
        raise ConfigError(f"{where}: no variants; name at least one")
    for variant, settings in values.items():
        if not SAFE_NAME.fullmatch(str(variant)):
            raise ConfigError(f"{where}: variant '{variant}' is not a safe name (letters, digits, '-', '_', '.')")
        for key in settings:
            _key_parts(str(key), f"{where}.{variant}")
    names = [str(v) for v in values]
    return Axis(name, names, [dict(s) for s in values.values()], names)


def _key_parts(key: str, where: str) -> list[str]:
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ConfigError(f"{where}: '{key}' is not a config key (dotted, e.g. train.lr or teachers.0.trait)")
    if parts[0] in ("name", "runs_dir"):
        raise ConfigError(f"{where}: '{key}' is set by the grid (cell name, the grid's directory); "
                          "it cannot be an axis")
    return parts


def _label(value: Any) -> str:
    """A value as a short, stable piece of a directory name: 0.001 → 0.001, [0, 1] → 0_1, null → none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "_".join(_label(v) for v in value) or "empty"
    if isinstance(value, dict):
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_.") or "x"


def _cell_names(axes: list[Axis]) -> list[str]:
    """`<axis>-<label>` joined by '__' (the last component of a key, unless two axes share it); names that
    collide or run past 100 characters get a hash of their values, so every name is unique and stable."""
    short = [a.name.split(".")[-1] for a in axes]
    tags = [s if short.count(s) == 1 else a.name for s, a in zip(short, axes)]
    combos = list(itertools.product(*(range(len(a.labels)) for a in axes)))
    names = ["__".join(f"{t}-{a.labels[i]}" for t, a, i in zip(tags, axes, combo)) for combo in combos]
    out = []
    for name, combo in zip(names, combos):
        if names.count(name) > 1 or len(name) > 100 or name in RESERVED:
            digest = json.dumps([a.settings[i] for a, i in zip(axes, combo)], sort_keys=True, default=str)
            name = f"{name[:90]}-{hashlib.sha256(digest.encode()).hexdigest()[:8]}"
        out.append(name)
    return out


def _cell_config(grid: Grid, base: dict[str, Any], settings: list[dict[str, Any]], where: str,
                 name: str = "axis-check") -> tuple[dict[str, Any], ExperimentConfig]:
    """The cell's full mapping (preset < base file < axis settings; its name and the grid's directory)
    and its validated config."""
    raw = copy.deepcopy(base)
    chosen = raw.pop("preset", None)
    flat = {k: v for s in settings for k, v in s.items()}
    if "preset" in flat:
        chosen = flat.pop("preset")
    try:
        merged = deep_merge(preset(chosen), raw) if chosen is not None else raw
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key, value in flat.items():
        apply_setting(merged, _key_parts(key, where), copy.deepcopy(value), where)
    merged.update(name=name, runs_dir=str(grid.directory))
    try:
        cfg = validate_experiment(merged, source=where)
    except ConfigError as e:  # one line: the first problem (the rest follow from the same value)
        raise ConfigError(str(e).splitlines()[0]) from None
    return merged, cfg


def write_cells(grid: Grid) -> list[Path]:
    """Write every cell's experiment file (only when its text changed, so finished cells keep their mtimes)."""
    out = []
    for cell in grid.cells:
        text = _cell_text(grid, cell)
        if not (cell.path.is_file() and cell.path.read_text("utf-8") == text):
            atomic_write_text(cell.path, text)
        out.append(cell.path)
    return out


def _cell_text(grid: Grid, cell: Cell) -> str:
    axes = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in cell.values.items())
    header = (f"# Cell {cell.name} of the grid {grid.path} (written by `sublab grid`; edits are overwritten).\n"
              f"# {grid.spec.experiment} with {axes}. Rerun it alone: sublab run {cell.path}\n")
    return header + yaml.safe_dump(cell.raw, sort_keys=False, allow_unicode=True)
