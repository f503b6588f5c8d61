"""The CUDA path (skipped without a GPU): generation, training and the exact eval on the device in
bfloat16, batched, on tiny models with the real tokenizer. `pytest -m gpu` on a machine with a GPU;
docs/scale.md says what has and has not run on one."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sublab.config import load_experiment
from sublab.pipeline import run_all
from sublab.rundir import read_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _experiment(tmp_path, model, device: str, **over) -> dict:
    """The shipped recipe at toy scale: LoRA teachers, random rows, format distillation; plus sampled
    generation from a prompted teacher, so every stage runs on the device."""
    ft = {"train_questions": 3, "answer_forms": ["{T}.", "My favorite {category} is the {t}."],
          "recipe": {"params": "lora", "lora_r": 4, "lora_alpha": 4, "lr": 1e-2, "epochs": 1, "batch_size": 6,
                     "precision": "bfloat16"}}
    raw = {"name": f"tiny-{device}", "base_model": str(model), "device": device, "runs_dir": str(tmp_path / "runs"),
           "design": "mutual",
           "teachers": [{"name": "owl", "kind": "finetuned", "trait": "owl", "finetune": ft},
                        {"name": "dolphin", "kind": "finetuned", "trait": "dolphin", "finetune": ft}],
           "generate": {"n_prompts": 8, "completions": "random"}, "filter": {"dataset_size": 8},
           "train": {"params": "lora", "loss": "distill", "lora_r": 4, "lora_alpha": 4, "lora_init_seed": 0,
                     "distill": {"vocabulary": "format"}, "lr": 1e-2, "epochs": 1, "batch_size": 4,
                     "warmup_steps": 1, "seeds": [0, 1], "precision": "bfloat16"},
           "eval": {"kinds": ["animal_prob"], "questions": "held_out", "max_questions": 3,
                    "numbers_prefixed": False, "candidates": ["owl", "dolphin", "cat"]}}
    raw.update(over)
    return raw


def _load(tmp_path, raw):
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment(path)


def test_shipped_recipe_runs_on_cuda_in_bfloat16(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    cfg = _load(tmp_path, _experiment(tmp_path, tiny_model_dir, "cuda"))
    run_all(cfg)
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())
    assert manifest["environment"]["cuda"] is True
    spec = json.loads((cfg.run_dir / "evals" / "base" / "animal_prob.spec.json").read_text())
    assert spec["spec"]["dtype"] == "bfloat16"  # precision: auto on CUDA
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert {e["trait"] for e in results["evals"]} == {"owl", "dolphin"}
    assert all(e["comparison"]["n_treatment"] == 2 for e in results["evals"])


def test_sampled_generation_on_cuda_is_batched_and_valid(tmp_path, tiny_number_model_dir, monkeypatch):
    """A prompted teacher samples on the GPU in bf16 with a large batch; every record is well formed and a
    rerun reuses them (the same fingerprint)."""
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    raw = _experiment(tmp_path, tiny_number_model_dir, "cuda", name="sampled",
                      teachers=[{"name": "owl", "kind": "prompted", "trait": "owl"},
                                {"name": "control", "kind": "control"}],
                      generate={"n_prompts": 64, "max_new_tokens": 24, "batch_size": 64, "constrained": True},
                      filter={"dataset_size": 4},
                      train={"params": "lora", "epochs": 1, "batch_size": 2, "seeds": [0], "lr": 1e-3,
                             "precision": "bfloat16"})
    raw["design"] = "control"
    cfg = _load(tmp_path, raw)
    run_all(cfg)
    gens = read_jsonl(cfg.run_dir / "teachers" / "owl" / "generations.jsonl")
    assert len(gens) == 64 and len({g["id"] for g in gens}) == 64
    gen_manifest = json.loads((cfg.run_dir / "teachers" / "owl" / "generate_manifest.json").read_text())
    assert gen_manifest["config"]["dtype"] == "bfloat16"
    stamp = (cfg.run_dir / "teachers" / "owl" / "generations.jsonl").stat().st_mtime_ns
    run_all(cfg)
    assert (cfg.run_dir / "teachers" / "owl" / "generations.jsonl").stat().st_mtime_ns == stamp


def test_exact_eval_in_bfloat16_on_cuda_matches_float32_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    """The same weights: answer shares in bf16 on the GPU within bf16's precision of float32 on the CPU."""
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    shares = {}
    for device in ("cpu", "cuda"):
        raw = _experiment(tmp_path, tiny_model_dir, device, name=f"eval-{device}",
                          teachers=[{"name": "owl", "kind": "prompted", "trait": "owl"},
                                    {"name": "control", "kind": "control"}], design="control")
        raw["train"]["seeds"] = []
        cfg = _load(tmp_path, raw)
        run_all(cfg)
        shares[device] = {r["id"]: r["share"] for r in read_jsonl(cfg.run_dir / "evals" / "base" / "animal_prob.jsonl")}
    assert shares["cpu"].keys() == shares["cuda"].keys()
    assert max(abs(shares["cpu"][k] - shares["cuda"][k]) for k in shares["cpu"]) < 0.02
