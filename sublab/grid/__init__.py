"""Grids: a base experiment × axes of config values, each cell an ordinary experiment file, run as Ray
tasks (`sublab grid GRID.yaml [--dry-run] [--address ADDR] [--workers N]`).

    cells.py    the grid file, its cells (validated, written to <grid>/cells/<cell>.yaml)
    plan.py     the dry-run plan: cells, shared teachers, students, finished cells, estimated cost
    engine.py   Ray: one task per unfinished cell, retries, progress, Ctrl-C
    results.py  grid_results.json, grid_report.md and a figure across cells

    from sublab.grid import load_grid, run_grid, write_grid_results
    grid = load_grid("experiments/transfer/grid.yaml")
    run_grid(grid, workers=2)
    write_grid_results(grid)
"""

from sublab.grid.cells import Cell, Grid, load_grid, write_cells
from sublab.grid.engine import GridOutcome, run_grid
from sublab.grid.plan import GridPlan, cell_is_done, plan_grid
from sublab.grid.results import write_grid_results

__all__ = ["Cell", "Grid", "GridOutcome", "GridPlan", "cell_is_done", "load_grid", "plan_grid", "run_grid",
           "write_cells", "write_grid_results"]
