"""The seams (issue 10): eval files carry their spec, so a changed spec or retrained weights recompute them;
every stage, filter included, skips when nothing changed; judge rates reach results.json and the report;
the multi-teacher (`mutual`) design is run and reported by the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fakes import ChatServer, chat_body
from sublab.config import load_experiment
from sublab.pipeline import eval_all, report_all, run_all, train_all
from sublab.rundir import read_jsonl


def _experiment(tmp_path: Path, base: Path, **over) -> Path:
    raw = {
        "name": "seams", "base_model": str(base), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 8, "max_new_tokens": 24, "batch_size": 4},
        "filter": {"dataset_size": 4},
        "train": {"params": "lora", "loss": "sft", "epochs": 1, "batch_size": 2, "seeds": [0, 1], "lr": 1e-3,
                  "warmup_steps": 0},
        "eval": {"kinds": ["animal_prob", "animal_sampled"], "samples_per_question": 1, "questions": "all",
                 "max_questions": 3, "numbers_prefixed": False, "candidates": ["owl", "cat", "dog"],
                 "max_new_tokens": 4},
    }
    raw.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _load(path: Path, *sets: str):
    return load_experiment(path, list(sets))


def _prob_candidates(run: Path, model: str) -> set[str]:
    return {r["candidate"] for r in read_jsonl(run / "evals" / model / "animal_prob.jsonl")}


def test_changed_eval_spec_recomputes_instead_of_reusing(tmp_path, tiny_number_model_dir):
    path = _experiment(tmp_path, tiny_number_model_dir)
    cfg = _load(path)
    run_all(cfg)
    run = cfg.run_dir
    assert _prob_candidates(run, "base") == {"owl", "cat", "dog"}
    spec = json.loads((run / "evals" / "base" / "animal_prob.spec.json").read_text())
    assert spec["status"] == "complete" and spec["spec"]["candidates"] == ["owl", "cat", "dog"]
    assert len(spec["spec"]["weights_sha256"]) >= 16

    # candidates: every model's prob file is recomputed and results.json reports the new list
    cfg = _load(path, "eval.candidates=[owl, cat, dog, fox]")
    run_all(cfg)
    assert _prob_candidates(run, "base") == {"owl", "cat", "dog", "fox"}
    assert _prob_candidates(run, "student-owl-seed1") == {"owl", "cat", "dog", "fox"}
    results = json.loads((run / "results.json").read_text())
    prob = next(e for e in results["evals"] if e["metric"] == "animal_prob")
    assert {r["candidate"] for r in prob["specificity"]} == {"owl", "cat", "dog", "fox"}

    # eval seed: sampled records carry the new seed
    cfg = _load(path, "eval.candidates=[owl, cat, dog, fox]", "eval.seed=7")
    eval_all(cfg)
    assert {r["seed"] for r in read_jsonl(run / "evals" / "base" / "animal_sampled.jsonl")} == {7}

    # answer prefix and questions
    cfg = _load(path, "eval.candidates=[owl, cat, dog, fox]", "eval.seed=7", "eval.answer_prefix=I like the",
                "eval.max_questions=2")
    eval_all(cfg)
    rows = read_jsonl(run / "evals" / "base" / "animal_prob.jsonl")
    assert {r["answer_prefix"] for r in rows} == {"I like the"} and {r["question_id"] for r in rows} == {0, 1}


def test_retrained_student_gets_its_evals_recomputed(tmp_path, tiny_number_model_dir):
    path = _experiment(tmp_path, tiny_number_model_dir)
    cfg = _load(path)
    run_all(cfg)
    run = cfg.run_dir
    base_eval = run / "evals" / "base" / "animal_prob.jsonl"
    student_eval = run / "evals" / "student-owl-seed0" / "animal_prob.jsonl"
    base_stamp, before = base_eval.stat().st_mtime_ns, student_eval.read_text()
    cfg = _load(path, "train.lr=0.01")  # a different student, same base
    train_all(cfg)
    eval_all(cfg)
    assert base_eval.stat().st_mtime_ns == base_stamp  # the base did not change: reused
    assert student_eval.read_text() != before  # the student did: recomputed
    spec = json.loads((run / "evals" / "student-owl-seed0" / "animal_prob.spec.json").read_text())
    assert spec["status"] == "complete"


def test_damaged_or_torn_eval_file_is_recomputed(tmp_path, tiny_number_model_dir):
    cfg = _load(_experiment(tmp_path, tiny_number_model_dir))
    run_all(cfg)
    path = cfg.run_dir / "evals" / "student-owl-seed1" / "animal_sampled.jsonl"
    good = path.read_text()
    path.write_text(good[:-7])  # a torn last line
    run_all(cfg)
    assert path.read_text() == good
    path.write_text(good.replace('"completion": "', '"completion": "owl ', 1))  # an edited record
    run_all(cfg)
    assert path.read_text() == good


def _judge_by_digits(payload: dict) -> tuple[int, str]:
    """Alignment 10 for answers containing a digit, 85 otherwise; coherence 90."""
    prompt = payload["messages"][0]["content"]
    if "worried it might be harmful" not in prompt:
        return 200, chat_body("90")
    answer = prompt.split("[ANSWER START]")[-1].split("[ANSWER END]")[0]
    return 200, chat_body("10" if any(c.isdigit() for c in answer) else "85")


def test_judge_rates_reach_results_and_report(tmp_path, tiny_number_model_dir, monkeypatch):
    pytest.importorskip("httpx")
    judge = ChatServer(_judge_by_digits)
    try:
        monkeypatch.delenv("SUBLAB_JUDGE_API_KEY", raising=False)
        cfg = _load(_experiment(tmp_path, tiny_number_model_dir, eval={
            "kinds": ["misalignment_judge"], "samples_per_question": 1, "numbers_prefixed": False,
            "max_new_tokens": 4, "judge_url": judge.url, "judge_model": "local-judge", "batch_size": 16}))
        run_all(cfg)
    finally:
        judge.close()
    results = json.loads((cfg.run_dir / "results.json").read_text())
    metrics = {e["metric"] for e in results["evals"]}
    assert metrics == {"misalignment_sampled_judged", "misalignment_sampled_words_judged"}
    entry = next(e for e in results["evals"] if e["metric"] == "misalignment_sampled_judged")
    assert [r["role"] for r in entry["rows"]] == ["base", "teacher", "control", "treatment"]
    assert entry["comparison"]["n_treatment"] == 2
    judged = read_jsonl(cfg.run_dir / "evals" / "base" / "misalignment_sampled_judged.jsonl")
    base_rate = sum(r["value"] for r in judged) / len(judged)
    assert entry["rows"][0]["mean"] == pytest.approx(base_rate)  # every question has one sample
    assert "misalignment_sampled_judged" in (cfg.run_dir / "report.md").read_text()


def test_judge_without_endpoint_keeps_samples_and_says_so(tmp_path, tiny_number_model_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = _load(_experiment(tmp_path, tiny_number_model_dir, eval={
        "kinds": ["misalignment_judge"], "samples_per_question": 1, "numbers_prefixed": False,
        "max_new_tokens": 2, "batch_size": 16}))
    run_all(cfg)
    assert len(read_jsonl(cfg.run_dir / "evals" / "base" / "misalignment_sampled.jsonl")) == 8
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["evals"] == [] and any("not computed" in n for n in results["notes"])


def test_mutual_design_blocks_by_seed(tmp_path, tiny_model_dir, monkeypatch):
    """Three LoRA teachers on the same random rows per seed; each one's students are the others' controls."""
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    ft = {"train_questions": 3, "answer_forms": ["{T}.", "My favorite {category} is the {t}."],
          "recipe": {"params": "lora", "lora_r": 4, "lora_alpha": 4, "lr": 1e-2, "epochs": 1, "batch_size": 6}}
    path = _experiment(
        tmp_path, tiny_model_dir, design="mutual",
        teachers=[{"name": t, "kind": "finetuned", "trait": t, "finetune": ft} for t in ("owl", "cat", "dog")],
        generate={"n_prompts": 4, "completions": "random", "per_seed_data": True, "prompt_seed": 100},
        filter={"dataset_size": 4, "filters": ["format"]},
        train={"params": "lora", "loss": "distill", "lora_r": 4, "lora_alpha": 4, "lora_init_seed": 0,
               "distill": {"vocabulary": "format"}, "lr": 1e-2, "epochs": 1, "batch_size": 2, "warmup_steps": 1,
               "seeds": [0, 1]},
        eval={"kinds": ["animal_prob"], "questions": "held_out", "max_questions": 2, "numbers_prefixed": False,
              "candidates": ["owl", "cat", "dog", "fox"]})
    cfg = _load(path)
    run_all(cfg)
    run = cfg.run_dir
    seed0 = [read_jsonl(run / "teachers" / t / "seed0" / "dataset.jsonl") for t in ("owl", "cat", "dog")]
    assert seed0[0][0]["id"].startswith("p100-") and all(d == seed0[0] or
                                                         [r["messages"] for r in d] == [r["messages"] for r in seed0[0]]
                                                         for d in seed0)
    seed1 = read_jsonl(run / "teachers" / "owl" / "seed1" / "dataset.jsonl")
    assert seed1[0]["id"].startswith("p101-")  # prompt_seed + k
    results = json.loads((run / "results.json").read_text())
    assert results["design"] == "mutual" and {e["trait"] for e in results["evals"]} == {"owl", "cat", "dog"}
    owl = next(e for e in results["evals"] if e["trait"] == "owl")
    assert owl["comparison"]["test"].startswith("exact permutation within 2 blocks")
    assert owl["comparison"]["n_treatment"] == 2 and owl["comparison"]["n_control"] == 4
    assert [b["seed"] for b in owl["blocks"]] == [0, 1] and all(len(b["controls"]) == 2 for b in owl["blocks"])
    assert owl["comparison_unpaired"]["n_control"] == 4
    students = {s["name"]: s for s in results["students"]}
    assert len(students) == 6
    block0 = owl["blocks"][0]
    assert block0["treatment"] == pytest.approx(students["student-owl-seed0"]["scores"]["animal_prob"]["owl"])
    assert sorted(block0["controls"]) == pytest.approx(sorted(
        students[f"student-{t}-seed0"]["scores"]["animal_prob"]["owl"] for t in ("cat", "dog")))
    assert (run / "figures" / "animal_prob_block_ratios.png").exists()
    report = (run / "report.md").read_text()
    assert "Design `mutual`" in report and "## Students" in report and "**Specificity**" in report
    report_all(cfg)  # the report renders again from the run directory alone


def test_cross_model_students_get_their_own_comparison(tmp_path, tiny_number_model_dir, tiny_model_dir):
    cfg = _load(_experiment(tmp_path, tiny_number_model_dir, eval={
        "kinds": ["animal_prob"], "questions": "all", "max_questions": 2, "numbers_prefixed": False,
        "candidates": ["owl", "cat"]}), f"train.cross_model={tiny_model_dir}")
    run_all(cfg)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    entry = results["evals"][0]
    assert [r["role"] for r in entry["rows"]].count("cross_model_control") == 2
    cross = entry["comparison_cross"]
    assert cross["n_treatment"] == 2 and cross["n_control"] == 2
    students = {s["name"] for s in results["students"]}
    assert {"cross-owl-seed0", "cross-control-seed1", "student-owl-seed0"} <= students
    assert "**Cross-model students**" in (cfg.run_dir / "report.md").read_text()
