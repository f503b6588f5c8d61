"""Wall time of one grid with 1 worker (2 threads per cell) and with 2 workers (1 thread each), in one run,
and whether the two give the same per-student numbers (docs/scale.md).

The grid: the transfer study's recipe (experiments/transfer/lora8-shared-init.yaml, its four cached
teachers) split into seed cells and pooled, at a smaller size so both runs fit in ~15 minutes on 2 cores.

    python bench/grid_workers.py [--seeds 2] [--rows 32] [--out runs/bench-grid-workers]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from sublab.grid import load_grid, run_grid, write_grid_results

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "transfer" / "lora8-shared-init.yaml"


def write_grid(out: Path, workers: int, seeds: int, rows: int) -> Path:
    """A seed-split grid of the study's recipe; one CPU per cell with 2 workers, both with 1."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    base.write_text(yaml.safe_dump({"extends": str(STUDY), "name": "base",
                                    "generate": {"n_prompts": rows}, "filter": {"dataset_size": rows}}))
    grid = out / f"workers{workers}.yaml"
    grid.write_text(yaml.safe_dump({
        "name": f"workers{workers}", "experiment": base.name, "runs_dir": str(out), "pool": ["seeds"],
        "axes": {"seeds": {f"s{k}": {"train.seeds": [k]} for k in range(seeds)}},
        "resources": {"num_cpus": 2 // workers}}))
    return grid


def student_scores(grid_dir: Path) -> dict[str, dict]:
    results = json.loads((grid_dir / "pooled" / "all" / "results.json").read_text())
    return {s["name"]: s["scores"] for s in results["students"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-grid-workers")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    wall, scores = {}, {}
    for workers in (1, 2):
        grid = load_grid(write_grid(args.out, workers, args.seeds, args.rows))
        t0 = time.time()
        outcome = run_grid(grid, workers=workers)
        wall[workers] = time.time() - t0
        assert not outcome.failed, outcome.failed
        write_grid_results(grid)
        scores[workers] = student_scores(grid.directory)
        print(f"{workers} worker(s): {len(grid.cells)} cells in {wall[workers]:.0f} s "
              f"(cells: {', '.join(f'{k} {v:.0f} s' for k, v in outcome.ran.items())})", flush=True)
    diffs = [abs(a - b) / abs(a) for name, metrics in scores[1].items() for metric, per in metrics.items()
             for trait, a in per.items() for b in [scores[2][name][metric][trait]] if a]
    print(f"wall time 1 worker / 2 workers: {wall[1] / wall[2]:.2f}")
    print(f"per-student scores, 1 vs 2 workers: max relative difference {max(diffs):.2e} over {len(diffs)} values")


if __name__ == "__main__":
    main()
