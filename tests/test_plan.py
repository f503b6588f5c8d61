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
    """The demo as it ships (bf16, 2 workers: 392-395 s from an empty cache on 2 idle cores, docs/performance.md
    "The demo", step three) is estimated within 15% (the old fp32 live-teacher model said 943 s, ~16 min);
    an unmeasured model gets no guess."""
    from sublab.plan import experiment_seconds, stage_seconds

    demo_cfg = load_experiment(ROOT / "examples" / "owl-quick.yaml")
    demo = experiment_seconds(demo_cfg)
    assert demo is not None and 0.85 * 392 <= demo <= 1.15 * 395
    stages = stage_seconds(demo_cfg)  # its eval stage: 61.0-61.2 s (9 models, bf16)
    assert stages is not None and 0.85 * 61.0 <= stages["eval"] <= 1.15 * 61.2
    result = CliRunner().invoke(app, ["run", "--dry-run", str(ROOT / "examples" / "owl-quick.yaml")])
    assert result.exit_code == 0 and f"estimated time on 2 CPU cores: {round(demo / 60)} min" in result.output
    assert experiment_seconds(load_experiment(PAPER)) is None


def test_the_time_model_matches_the_other_measured_runs():
    """Each measured run, in the config it ran with (the rates' sources: sublab.plan.RATES_S)."""
    from sublab.plan import evaluated_count, experiment_seconds, run_seconds, stage_seconds

    fp32 = ROOT / "experiments" / "defences" / "owl-quick-fp32.yaml"
    # fp32 teachers, targets and evals, bf16 students, 1 worker: 653 s (performance.md "The demo", step one),
    # measured before the frozen bf16 weights and the evals' model loading, which only made it faster.
    est = experiment_seconds(load_experiment(fp32))
    assert est is not None and 0.9 * 653 <= est <= 653
    # Dose-response (docs/results.md "More student compute", experiments/transfer/dose_summary.json): the same
    # with 2 workers and 1/2/4 epochs, teachers and targets cached, train stage 259/516/904 s; the first two
    # ran beside the test suite (upper bounds), the 4-epoch one alone.
    train = {}
    for epochs, measured in ((1, 258.6), (2, 516.4), (4, 904.1)):
        stages = stage_seconds(load_experiment(fp32, ["train.workers=2", f"train.epochs={epochs}"]))
        assert stages is not None
        train[epochs] = stages["students"] + 18.5  # the train stage's own loading (RATES_S["loading"] comment)
        assert train[epochs] <= measured
    assert 0.9 * 904.1 <= train[4] <= 904.1
    # The transfer study's main cell: 47 min for its 20 students and 25 evals (docs/results.md "Cost and
    # commands"), teachers built beforehand, when every distillation ran the teacher live: today that is
    # full-vocabulary distillation (format distillation stores the targets instead).
    study = load_experiment(ROOT / "experiments" / "transfer" / "lora8-shared-init.yaml",
                            ["train.distill.vocabulary=full"])
    live = run_seconds(study, evaluated_count(study))
    assert live is not None and 0.67 * 47 * 60 <= live <= 1.33 * 47 * 60
