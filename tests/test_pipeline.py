"""End to end on a tiny random model with the real tokenizer: every stage runs, writes the run
directory of DESIGN.md, and a second run skips every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sublab.config import load_experiment
from sublab.errors import ConfigError
from sublab.pipeline import run_all
from sublab.rundir import read_jsonl


def _experiment(tmp_path: Path, base: Path, **over) -> Path:
    raw = {
        "name": "tiny", "base_model": str(base), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 10, "max_new_tokens": 24, "batch_size": 4},
        "filter": {"dataset_size": 4},
        "train": {"method": "lora", "epochs": 1, "batch_size": 2, "seeds": [0, 1], "lr": 1e-3},
        "eval": {"kinds": ["animal_prob", "animal_sampled"], "samples_per_question": 1, "questions": "all",
                 "max_questions": 5,
                 "numbers_prefixed": False, "candidates": ["owl", "cat", "dog"], "max_new_tokens": 4},
    }
    raw.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_end_to_end_then_everything_skips(tmp_path, tiny_number_model_dir):
    cfg = load_experiment(_experiment(tmp_path, tiny_number_model_dir))
    report = run_all(cfg)
    run = cfg.run_dir
    for t in ("owl", "control"):
        gens = read_jsonl(run / "teachers" / t / "generations.jsonl")
        assert len(gens) == 10
        dataset = read_jsonl(run / "teachers" / t / "dataset.jsonl")
        assert all(row["messages"][0]["role"] == "user" for row in dataset)  # never a system prompt
        rejects = read_jsonl(run / "teachers" / t / "rejects.jsonl")
        assert len(rejects) + json.loads((run / "teachers" / t / "filter_manifest.json").read_text())[
            "outputs"]["accepted"] == 10
        assert all(r["reasons"] for r in rejects)
    for seed in (0, 1):
        assert (run / "students" / f"owl-seed{seed}" / "adapter_model.safetensors").exists()
    results = json.loads((run / "results.json").read_text())
    metrics = {e["metric"] for e in results["evals"]}
    assert metrics == {"animal_prob", "animal_sampled"}
    prob = next(e for e in results["evals"] if e["metric"] == "animal_prob")
    assert [r["role"] for r in prob["rows"]] == ["base", "teacher", "control", "treatment"]
    assert prob["comparison"]["n_treatment"] == 2
    assert report.exists() and (run / "figures").is_dir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["name"] == "tiny" and "packages" in manifest["environment"]

    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.jsonl")}
    stamps |= {p: p.stat().st_mtime_ns for p in run.rglob("*manifest.json") if p.parent != run}
    run_all(cfg)
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name != "dataset.jsonl"
               and p.name != "rejects.jsonl" and p.name != "filter_manifest.json"]
    assert changed == []


def test_bad_config_names_the_field(tmp_path, tiny_model_dir):
    path = _experiment(tmp_path, tiny_model_dir, train={"method": "lora", "lr": "fast"})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_experiment(path)
    path = _experiment(tmp_path, tiny_model_dir, trian={})
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_experiment(path)
    path = _experiment(tmp_path, tiny_model_dir, base_model="embedded:nope")
    with pytest.raises(ConfigError, match="unknown embedded model"):
        load_experiment(path)
