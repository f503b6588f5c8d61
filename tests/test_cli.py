"""The `sublab` command on a tiny in-process-model experiment: stage by stage reaches a report (issue 11,
defect 6), and `sublab report` rebuilds results from the config the stages recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from sublab.cli import app
from sublab.config import dump, load_experiment


def _experiment(tmp_path: Path, base: Path) -> Path:
    raw = {
        "name": "tiny", "base_model": str(base), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 10, "max_new_tokens": 24, "batch_size": 4},
        "filter": {"dataset_size": 4},
        "train": {"epochs": 1, "batch_size": 2, "seeds": [0, 1], "lr": 1e-3},
        "eval": {"kinds": ["animal_prob"], "questions": "all", "max_questions": 3,
                 "numbers_prefixed": False, "candidates": ["owl", "cat", "dog"]},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ok(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_stage_by_stage_reaches_a_report(tmp_path, tiny_number_model_dir):
    exp = _experiment(tmp_path, tiny_number_model_dir)
    run = tmp_path / "runs" / "tiny"
    for stage in ("generate", "filter", "train", "eval"):
        _ok(stage, str(exp))
        recorded = json.loads((run / "config.json").read_text())
        assert recorded == dump(load_experiment(exp))
    assert not (run / "results.json").exists()  # only `run` used to write it

    output = _ok("report", str(run))
    results = json.loads((run / "results.json").read_text())
    prob = next(e for e in results["evals"] if e["metric"] == "animal_prob")
    assert prob["comparison"]["n_treatment"] == 2 and results["experiment"] == "tiny"
    assert (run / "report.md").exists()
    # Off a terminal the table is not squeezed to 80 columns: each row stays on one line.
    assert any("diff vs control" in line for line in output.splitlines()), output
    assert max(map(len, output.splitlines())) > 80

    # A moved run directory still reports from its own files, not from the recorded runs_dir.
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.move(run, moved)
    (moved / "results.json").unlink()
    _ok("report", str(moved))
    assert json.loads((moved / "results.json").read_text())["evals"] == results["evals"]
    assert not run.exists()

    # Without config.json (a run from before it was recorded), an existing results.json is rendered.
    (moved / "config.json").unlink()
    (moved / "report.md").unlink()
    _ok("report", str(moved))
    assert (moved / "report.md").exists()
