"""The worked examples of docs/extending.md: a data domain, an eval and a teacher kind, each added from its
own module (tests/toys/) with one registration line, run through the real pipeline on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sublab.config import load_experiment
from sublab.pipeline import filter_all, generate_all, run_all
from sublab.rundir import read_jsonl
from toys import both_kind, length_eval, letters_domain  # noqa: F401  (each registers itself)


def _experiment(tmp_path: Path, base: Path, **over) -> Path:
    raw = {
        "name": "toy", "base_model": str(base), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 6, "max_new_tokens": 12, "batch_size": 6},
        "filter": {"dataset_size": 6, "filters": ["format", "trait_words"]},
        "train": {"params": "lora", "loss": "distill", "epochs": 1, "batch_size": 3, "seeds": [0, 1], "lr": 1e-3,
                  "warmup_steps": 0},
        "eval": {"kinds": ["animal_prob"], "questions": "all", "max_questions": 2, "numbers_prefixed": False,
                 "candidates": ["owl", "cat"]},
    }
    raw.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_toy_domain_drives_generation_filtering_training_and_eval_prefixes(tmp_path, tiny_number_model_dir):
    # Sampled, constrained to the domain's tokens, stopped early by its predicate, filtered by its rules.
    cfg = load_experiment(_experiment(tmp_path, tiny_number_model_dir, domain="letters",
                                      generate={"n_prompts": 6, "max_new_tokens": 12, "batch_size": 6,
                                                "constrained": True}))
    generate_all(cfg)
    filter_all(cfg)
    gens = read_jsonl(cfg.run_dir / "teachers" / "owl" / "generations.jsonl")
    assert all(g["prompt"].startswith("Continue this sequence") and g["id"].startswith("l0-") for g in gens)
    assert all(set(g["completion"]) <= letters_domain.ALPHABET for g in gens)  # the domain's token mask
    rejects = read_jsonl(cfg.run_dir / "teachers" / "owl" / "rejects.jsonl")
    kept = read_jsonl(cfg.run_dir / "teachers" / "owl" / "dataset.jsonl")
    assert len(rejects) + len(kept) == 6
    assert all(letters_domain.LettersDomain().format_reason(r["messages"][1]["content"]) is None for r in kept)
    assert all(r.startswith(("format:", "unfinished:")) for x in rejects for r in x["reasons"])

    # Random completions in the domain's format, distilled; the prefixed eval variant asks the domain.
    cfg = load_experiment(_experiment(tmp_path, tiny_number_model_dir, name="toy2", domain="letters",
                                      generate={"n_prompts": 6, "completions": "random"},
                                      eval={"kinds": ["animal_prob"], "questions": "all", "max_questions": 2,
                                            "numbers_prefixed": True, "candidates": ["owl", "cat"]}))
    run_all(cfg)
    rows = read_jsonl(cfg.run_dir / "teachers" / "control" / "dataset.jsonl")
    assert len(rows) == 6 and all(letters_domain.LettersDomain().format_reason(r["messages"][1]["content"]) is None
                                  for r in rows)
    prefixed = read_jsonl(cfg.run_dir / "evals" / "student-owl-seed0" / "animal_prob_numbers.jsonl")
    assert prefixed and all(r["question"].startswith("Look at these letters: ") for r in prefixed)
    spec = json.loads((cfg.run_dir / "evals" / "base" / "animal_prob_numbers.spec.json").read_text())
    assert spec["spec"]["prefix_domain"] == "letters"


def test_toy_eval_runs_resumes_and_reaches_results(tmp_path, tiny_number_model_dir):
    cfg = load_experiment(_experiment(tmp_path, tiny_number_model_dir, generate={"n_prompts": 6,
                                                                                 "completions": "random"},
                                      eval={"kinds": ["toy_length"], "questions": "all", "max_questions": 3}))
    run_all(cfg)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    entry = next(e for e in results["evals"] if e["metric"] == "toy_length")
    rows = {r["role"]: r for r in entry["rows"]}
    assert rows["teacher"]["mean"] > rows["base"]["mean"]  # the owl teacher's system prompt adds tokens
    assert rows["treatment"]["mean"] == rows["base"]["mean"]  # students are asked in the default context
    assert entry["metric_label"] == "prompt length in tokens (owl teacher)"
    path = cfg.run_dir / "evals" / "base" / "toy_length.jsonl"
    stamp = path.stat().st_mtime_ns
    run_all(cfg)
    assert path.stat().st_mtime_ns == stamp  # complete and unchanged: skipped


def test_toy_teacher_kind_is_built_and_sampled_by_its_behaviour(tmp_path, tiny_number_model_dir, monkeypatch):
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    ft = {"train_questions": 3, "answer_forms": ["{T}."], "recipe": {"params": "lora", "lora_r": 4, "lora_alpha": 4,
                                                                    "lr": 1e-2, "epochs": 1, "batch_size": 3}}
    cfg = load_experiment(_experiment(tmp_path, tiny_number_model_dir, teachers=[
        {"name": "owl", "kind": "finetuned_prompted", "trait": "owl", "finetune": ft},
        {"name": "control", "kind": "control"}]))
    generate_all(cfg)
    manifest = json.loads((cfg.run_dir / "teachers" / "owl" / "generate_manifest.json").read_text())
    teacher = manifest["config"]["teacher"]
    assert teacher["kind"] == "finetuned_prompted" and "owl" in teacher["system_prompt"]
    assert str(tmp_path / "home" / "teachers") in teacher["model_ref"]  # its own fine-tuned weights
    assert manifest["inputs"]["model_sha256"] != "none (programmatic)"
