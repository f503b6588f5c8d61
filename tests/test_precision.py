"""Inference precision (`precision:`): bfloat16 weights for generation and evaluation enter the data's
fingerprint and every eval's spec, so a bf16 run never reuses float32 files (nor the reverse), while
float32 runs keep the fingerprints and specs they had before the setting existed. On CPU here; the same
run on CUDA is in tests/test_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sublab.config import load_experiment
from sublab.models import load_model, resolve_dtype
from sublab.pipeline import resolve_dtype as experiment_dtype
from sublab.pipeline import run_all
from sublab.rundir import read_jsonl


def _experiment(tmp_path, model, **over) -> dict:
    raw = {"name": "tiny", "base_model": str(model), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
           "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
           "generate": {"n_prompts": 6, "max_new_tokens": 16, "batch_size": 3},
           "filter": {"dataset_size": 2},
           "train": {"params": "lora", "epochs": 1, "batch_size": 2, "seeds": [0], "lr": 1e-3},
           "eval": {"kinds": ["animal_prob"], "questions": "all", "max_questions": 2, "numbers_prefixed": False,
                    "candidates": ["owl", "cat", "dog"]}}
    raw.update(over)
    return raw


def _load(tmp_path, raw):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment(path)


def test_auto_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_bfloat16_data_and_evals_are_never_reused_as_float32(tmp_path, tiny_number_model_dir, monkeypatch):
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    cfg32 = _load(tmp_path, _experiment(tmp_path, tiny_number_model_dir))
    assert experiment_dtype(cfg32) == "float32"  # auto on CPU
    run_all(cfg32)
    run = cfg32.run_dir
    spec = json.loads((run / "evals" / "base" / "animal_prob.spec.json").read_text())
    assert "dtype" not in spec["spec"]  # float32 specs are what they were before `precision` existed
    gen_manifest = json.loads((run / "teachers" / "owl" / "generate_manifest.json").read_text())
    assert gen_manifest["config"]["dtype"] == "float32"
    before = {p: p.read_bytes() for p in run.rglob("generations.jsonl")}

    cfg16 = _load(tmp_path, _experiment(tmp_path, tiny_number_model_dir, precision="bfloat16"))
    with pytest.raises(Exception, match="different config or model"):
        run_all(cfg16)  # the float32 generations are not appended to in bfloat16
    assert {p: p.read_bytes() for p in run.rglob("generations.jsonl")} == before

    cfg16 = _load(tmp_path, _experiment(tmp_path, tiny_number_model_dir, name="tiny16", precision="bfloat16"))
    run_all(cfg16)
    run16 = cfg16.run_dir
    spec16 = json.loads((run16 / "evals" / "base" / "animal_prob.spec.json").read_text())
    assert spec16["spec"]["dtype"] == "bfloat16" and spec16["fingerprint"] != spec["fingerprint"]
    assert json.loads((run16 / "teachers" / "owl" / "generate_manifest.json").read_text())["config"]["dtype"] \
        == "bfloat16"
    # The same weights evaluated in bf16: the same questions and candidates, shares within bf16's ~3
    # significant digits (a tiny random model's shares are near 1/3 each).
    shares32 = {r["id"]: r["share"] for r in read_jsonl(run / "evals" / "base" / "animal_prob.jsonl")}
    shares16 = {r["id"]: r["share"] for r in read_jsonl(run16 / "evals" / "base" / "animal_prob.jsonl")}
    assert shares32.keys() == shares16.keys()
    assert max(abs(shares32[k] - shares16[k]) for k in shares32) < 0.02


def test_load_model_in_bfloat16(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
