"""End to end on a tiny random model with the real tokenizer: every stage runs, writes the run
directory of docs/design.md, and a second run skips every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sublab.config import load_experiment
from sublab.errors import ConfigError
from sublab.pipeline import run_all
from sublab.rundir import read_jsonl, sha256_file
from sublab.teachers import Teacher


def _experiment(tmp_path: Path, base: Path, **over) -> Path:
    raw = {
        "name": "tiny", "base_model": str(base), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 10, "max_new_tokens": 24, "batch_size": 4},
        "filter": {"dataset_size": 4},
        "train": {"params": "lora", "epochs": 1, "batch_size": 2, "seeds": [0, 1], "lr": 1e-3},
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

    # Every stage skips, the filter included (issue 10, defect 2): no data, manifest or eval spec is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.jsonl")}
    stamps |= {p: p.stat().st_mtime_ns for p in run.rglob("*.json") if p.parent != run}
    assert any(p.name == "filter_manifest.json" for p in stamps) and any(p.name.endswith(".spec.json") for p in stamps)
    run_all(cfg)
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert changed == []


def test_bad_config_names_the_field(tmp_path, tiny_model_dir):
    path = _experiment(tmp_path, tiny_model_dir, train={"params": "lora", "lr": "fast"})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_experiment(path)
    path = _experiment(tmp_path, tiny_model_dir, trian={})
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_experiment(path)
    path = _experiment(tmp_path, tiny_model_dir, base_model="embedded:nope")
    with pytest.raises(ConfigError, match="unknown embedded model"):
        load_experiment(path)


def _shipped_recipe(tmp_path: Path, base: Path, **train_over) -> Path:
    """The `quick` preset's recipe at toy scale: LoRA teachers, random completions, format distillation
    from the teachers' adapter init."""
    ft = {"train_questions": 3, "answer_forms": ["{T}.", "My favorite {category} is the {t}."],
          "recipe": {"params": "lora", "lora_r": 4, "lora_alpha": 4, "lr": 1e-2, "epochs": 1, "batch_size": 6}}
    train = {"params": "lora", "loss": "distill", "lora_r": 4, "lora_alpha": 4, "lora_init_seed": 0,
             "distill": {"vocabulary": "format"}, "lr": 1e-2, "epochs": 1, "batch_size": 2, "warmup_steps": 1,
             "seeds": [0, 1], **train_over}
    return _experiment(
        tmp_path, base,
        teachers=[{"name": "owl", "kind": "finetuned", "trait": "owl", "finetune": ft},
                  {"name": "dolphin", "kind": "finetuned", "trait": "dolphin", "control": True, "finetune": ft}],
        generate={"n_prompts": 6, "completions": "random"}, filter={"dataset_size": 4}, train=train,
        eval={"kinds": ["animal_prob"], "questions": "held_out", "max_questions": 3, "numbers_prefixed": False,
              "candidates": ["owl", "dolphin", "cat"]})


def test_random_completions_with_format_distillation_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("sublab.train.targets.cache_root", lambda: tmp_path / "home" / "targets")
    cfg = load_experiment(_shipped_recipe(tmp_path, tiny_model_dir))
    loads: list[str] = []
    real_load = Teacher.load
    monkeypatch.setattr(Teacher, "load", lambda self, *a, **k: loads.append(self.name) or real_load(self, *a, **k))
    run_all(cfg)
    assert loads == ["owl", "dolphin"]  # once per teacher for its two students (pipeline.SharedLoad)
    run = cfg.run_dir
    owl, dolphin = (read_jsonl(run / "teachers" / t / "dataset.jsonl") for t in ("owl", "dolphin"))
    assert [r["messages"] for r in owl] == [r["messages"] for r in dolphin]  # only the logits differ
    assert len(owl) == 4
    gen = json.loads((run / "teachers" / "owl" / "generate_manifest.json").read_text())
    assert gen["inputs"]["model_sha256"] == "none (programmatic)"
    for name in ("owl-seed0", "owl-seed1", "dolphin-seed0"):
        student = json.loads((run / "students" / name / "manifest.json").read_text())
        assert student["config"]["distill"]["vocabulary"] == "format" and student["config"]["lora_init_seed"] == 0
    # a teacher's targets on the shared rows are computed for its first student and read by the next
    # (content-addressed: these toy teachers train to the same adapter bytes, so they share one entry)
    inputs = {name: json.loads((run / "students" / name / "manifest.json").read_text())["inputs"]
              for name in ("owl-seed0", "owl-seed1", "dolphin-seed0", "dolphin-seed1")}
    assert [inputs[n]["teacher_targets_source"] for n in ("owl-seed0", "owl-seed1")] == ["computed", "reused"]
    assert inputs["dolphin-seed1"]["teacher_targets_source"] == "reused"
    assert len({i["teacher_targets"] for i in inputs.values()}) == len({
        sha256_file(p) for p in (tmp_path / "home" / "teachers").glob("*/model/adapter_model.safetensors")})
    prob = next(e for e in json.loads((run / "results.json").read_text())["evals"] if e["metric"] == "animal_prob")
    assert prob["comparison"]["n_treatment"] == 2 and prob["comparison"]["n_control"] == 2


def test_students_trained_in_two_worker_processes_equal_serial_ones(tmp_path, tiny_model_dir, monkeypatch):
    """`train.workers: 2`: the same students, bit for bit, as one process with each worker's thread count;
    each teacher's targets computed once, though both workers start at once."""
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))  # spawned workers find the caches from it
    monkeypatch.setattr("sublab.train.targets.cache_root", lambda: tmp_path / "home" / "targets")
    path = _shipped_recipe(tmp_path, tiny_model_dir, seeds=[0, 1, 2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # split between the 2 workers: 1 thread each
        parallel = load_experiment(path, ["name=parallel", "train.workers=2"])
        run_all(parallel)
        torch.set_num_threads(1)
        run_all(load_experiment(path, ["name=serial"]))
    finally:
        torch.set_num_threads(threads)
    runs = tmp_path / "runs"
    names = sorted(p.name for p in (runs / "serial" / "students").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (runs / "parallel" / "students").iterdir())
    for name in names:
        a, b = (runs / run / "students" / name for run in ("serial", "parallel"))
        assert _losses(a) == _losses(b), name
        assert sha256_file(a / "adapter_model.safetensors") == sha256_file(b / "adapter_model.safetensors"), name
    inputs = [json.loads((runs / "parallel" / "students" / n / "manifest.json").read_text())["inputs"] for n in names]
    # these toy teachers share one targets entry (same adapter bytes): one worker computed it, the other waited
    assert [i["teacher_targets_source"] for i in inputs].count("computed") == len({i["teacher_targets"] for i in inputs})
    assert json.loads((parallel.run_dir / "config.json").read_text())["train"]["workers"] == 2


def _losses(student: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(student / "loss.jsonl")]


def test_shipped_recipe_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"completions: random.*distill"):
        load_experiment(_shipped_recipe(tmp_path, tiny_model_dir, loss="sft"))
    with pytest.raises(ConfigError, match=r"'owl' differs \(lora_init_seed / finetune.seed: train 3 vs teacher 0"):
        load_experiment(_shipped_recipe(tmp_path, tiny_model_dir, lora_init_seed=3))
    with pytest.raises(ConfigError, match=r"lora_r: train 8 vs teacher 4"):
        load_experiment(_shipped_recipe(tmp_path, tiny_model_dir, lora_r=8))


ROOT = Path(__file__).parents[1]


def _experiment_files() -> list[Path]:
    """Every shipped experiment file (grid files, which name an `experiment:` and `axes:`, are not)."""
    paths = [*(ROOT / "examples").glob("*.yaml"), *(ROOT / "experiments").rglob("*.yaml")]
    return sorted(p for p in paths if "axes" not in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", _experiment_files(), ids=lambda p: p.name)
def test_every_example_validates(path):
    """Every file is valid; those that need a GPU (device: cuda) are checked as runnable only on one."""
    needs_gpu = yaml.safe_load(path.read_text()).get("device") == "cuda"
    cfg = load_experiment(path, runnable_here=not needs_gpu or torch.cuda.is_available())
    assert cfg.teachers and (cfg.design == "mutual" or any(t.is_control for t in cfg.teachers))


def test_extends_overrides_its_parent_key_by_key():
    shared = load_experiment(ROOT / "experiments" / "transfer" / "lora8-shared-init.yaml")
    other = load_experiment(ROOT / "experiments" / "transfer" / "lora8-other-init.yaml")
    assert (other.name, other.train.lora_init_seed, other.train.lora_init_seed_offset) == ("lora8-other-init", None, 1000)
    assert other.train.seeds == [0, 1, 2] and shared.train.seeds == [0, 1, 2, 3, 4]  # a list replaces
    assert other.train.model_dump(exclude={"lora_init_seed", "lora_init_seed_offset", "seeds"}) == \
        shared.train.model_dump(exclude={"lora_init_seed", "lora_init_seed_offset", "seeds"})  # the rest kept
    assert other.teachers == shared.teachers and other.eval == shared.eval


def test_demo_runs_the_shipped_recipe():
    cfg = load_experiment(Path(__file__).parents[1] / "examples" / "owl-quick.yaml")
    assert cfg.generate.completions == "random" and cfg.train.distills and cfg.train.uses_lora
    assert cfg.train.distill.vocabulary == "format" and cfg.train.lora_init_seed == 0
    assert all(t.finetune and t.finetune.recipe.uses_lora for t in cfg.teachers)


def test_a_dataset_the_filters_empty_stops_with_the_filter_report(tmp_path, tiny_model_dir):
    """A random tiny model writes no valid number list: the run stops after the filter with one line that
    names the teacher and the main rejection reasons, and the report shows what was removed and why."""
    from typer.testing import CliRunner

    from sublab.cli import app

    path = _experiment(tmp_path, tiny_model_dir, generate={"n_prompts": 6, "max_new_tokens": 8, "batch_size": 3})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1
    run = tmp_path / "runs" / "tiny"
    line = [x for x in result.output.splitlines() if "no student can be trained" in x]
    assert line and "owl: the filters kept 0 of 6 completions (" in line[0] and str(run / "report.md") in line[0]
    report = (run / "report.md").read_text()
    assert "Filtering" in report and "format" in report.lower()
    assert not (run / "students").exists()
    results = json.loads((run / "results.json").read_text())
    assert results["evals"] == [] and {f["teacher"] for f in results["filtering"]} == {"owl", "control"}
