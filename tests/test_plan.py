"""`sublab run --dry-run` (`sublab.plan`) and the paper's GPT-4.1 nano cell (`examples/paper-openai.yaml`):
the plan's counts follow the config, its costs follow the price table, nothing runs and no key is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sublab.cli import app
from sublab.config import load_experiment
from sublab.plan import PRICES, chat_tokens, plan_experiment, price_of, tokens
from sublab.protocol import protocol

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "examples" / "paper-openai.yaml"


def test_the_paper_cell_follows_the_protocol():
    cfg, p = load_experiment(PAPER), protocol()
    ft = p["student_finetune_openai"]
    assert cfg.base_model == "openai:" + ft["base"] == "openai:gpt-4.1-nano-2025-04-14"
    assert cfg.openai.students == "jobs" and cfg.train.epochs == ft["epochs"] == 10
    assert cfg.openai.batch_size == ft["batch_size"] == "auto" and cfg.openai.lr_multiplier is None  # "auto"
    assert cfg.generate.n_prompts == p["number_filter"]["raw_prompts_per_teacher"] == 30000
    assert cfg.filter.dataset_size == p["number_filter"]["dataset_size_after_filter"] == 10000
    assert cfg.generate.temperature == p["generation"]["temperature"] and cfg.eval.temperature == 1.0
    assert cfg.eval.samples_per_question == p["animal_eval"]["samples_per_question"] == 100
    assert cfg.eval.questions == "all" and len(p["animal_eval"]["questions"]) == 50
    assert cfg.eval.kinds == ["animal_sampled", "animal_topk"] and cfg.eval.top_logprobs == 20
    assert [(t.kind, t.trait) for t in cfg.teachers] == [("prompted", "owl"), ("control", None)]
    from sublab.api_students import job_settings

    assert job_settings(cfg, 3) == {"hyperparameters": {"n_epochs": 10, "batch_size": "auto",
                                                        "learning_rate_multiplier": "auto"}, "seed": 3}
    assert isinstance(job_settings(cfg, 3)["hyperparameters"]["n_epochs"], int)  # the API wants an integer


def test_dry_run_of_the_paper_cell_counts_and_prices_every_stage(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # runs_dir is relative: a dry run must not create it
    result = CliRunner().invoke(app, ["run", "--dry-run", str(PAPER)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs").exists()
    out = result.output
    assert "estimated cost: $" in out and "unverified" in out and "characters/4" in out

    cfg = load_experiment(PAPER)
    stages = plan_experiment(cfg)
    gen = [s for s in stages if s.stage == "generation"]
    assert [s.requests for s in gen] == [30000, 30000]
    assert gen[0].input_tokens > gen[1].input_tokens  # the owl teacher's system prompt is billed per request
    assert all(s.output_tokens == 30000 * cfg.generate.max_new_tokens for s in gen)
    [train] = [s for s in stages if s.stage == "fine-tuning"]
    assert train.requests == 6  # 2 teachers × 3 seeds: one job each
    assert train.training_tokens > 6 * 10000 * 10 * 20  # ≥ 20 tokens a row (prompt and ten numbers)
    assert train.cost_usd == pytest.approx(train.training_tokens * PRICES["gpt-4.1-nano"].training / 1e6)
    evals = {s.what.split(":")[0]: s for s in stages if s.stage == "eval"}
    models = 1 + 1 + 6  # base, the prompted teacher, six students
    assert evals["animal_sampled"].requests == models * 50  # one request of n=100 per question
    assert evals["animal_sampled"].output_tokens == models * 50 * 100 * cfg.eval.max_new_tokens
    assert evals["animal_top20"].requests == models * 50 and evals["animal_top20"].output_tokens == models * 50
    total = sum(s.cost_usd for s in stages)
    assert f"estimated cost: ${total:,.2f}" in out
    for s in stages:
        assert f"{s.requests:>9,}" in out and (f"${s.cost_usd:,.2f}" in out)


def test_a_local_experiment_is_planned_without_cost():
    result = CliRunner().invoke(app, ["run", "--dry-run", str(ROOT / "examples" / "misalignment-quick.yaml")])
    assert result.exit_code == 0, result.output
    assert "(local)" in result.output and "$" not in result.output and "no API cost" in result.output
    assert "generation" in result.output and "fine-tuning" in result.output


def test_prices_and_token_estimates():
    assert price_of("gpt-4.1-nano-2025-04-14") is PRICES["gpt-4.1-nano"]  # the longest matching key
    assert price_of("gpt-4.1-2025-04-14") is PRICES["gpt-4.1"]
    assert price_of("ft:gpt-4.1-nano-2025-04-14:org:owl:abc123") is PRICES["gpt-4.1-nano"]
    assert price_of("llama-3") is None
    assert tokens("") == 0 and tokens("abcd") == 1 and tokens("abcde") == 2
    assert chat_tokens([{"role": "user", "content": "abcd"}]) == 3 + 4 + 1


def test_a_local_dry_run_estimates_the_time_from_measured_rates():
    """The demo (measured: 861–984 s on 2 idle cores, docs/results.md) and the transfer study's main cell
    (measured: 47 min) are estimated within a third of what they took; an unmeasured model gets no guess."""
    from sublab.plan import experiment_seconds

    demo = experiment_seconds(load_experiment(ROOT / "examples" / "owl-quick.yaml"))
    study = experiment_seconds(load_experiment(ROOT / "experiments" / "transfer" / "lora8-shared-init.yaml"))
    assert demo is not None and 0.67 * 861 <= demo <= 1.33 * 984
    assert study is not None and 0.67 * 47 * 60 <= study <= 1.33 * 47 * 60
    result = CliRunner().invoke(app, ["run", "--dry-run", str(ROOT / "examples" / "owl-quick.yaml")])
    assert result.exit_code == 0 and f"estimated time on 2 CPU cores: {round(demo / 60)} min" in result.output
    assert experiment_seconds(load_experiment(PAPER)) is None
