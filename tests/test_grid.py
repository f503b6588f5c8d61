"""`sublab grid`: grid files expand into validated cell experiment files (no Ray); a tiny two-cell grid runs
end to end on a local Ray cluster (2 CPUs), reruns skip everything, two cells sharing fine-tuned teachers
build each once, and a worker SIGKILLed mid-cell is retried to the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sublab.cli import app
from sublab.config import load_experiment
from sublab.errors import ConfigError
from sublab.grid import cell_is_done, load_grid, plan_grid, write_cells

RAY_TIMEOUT_S = 150
"""Bound on any one Ray grid run in these tests (a hang fails instead of stalling CI)."""


def _base(tmp_path: Path, model: Path) -> dict:
    """The shipped recipe at toy scale (tests/test_pipeline.py::_shipped_recipe): two LoRA teachers, random
    rows, format distillation from the teachers' adapter init."""
    ft = {"train_questions": 3, "answer_forms": ["{T}.", "My favorite {category} is the {t}."],
          "recipe": {"params": "lora", "lora_r": 4, "lora_alpha": 4, "lr": 1e-2, "epochs": 1, "batch_size": 6}}
    return {
        "name": "tiny", "base_model": str(model), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "teachers": [{"name": "owl", "kind": "finetuned", "trait": "owl", "finetune": ft},
                     {"name": "dolphin", "kind": "finetuned", "trait": "dolphin", "control": True, "finetune": ft}],
        "generate": {"n_prompts": 4, "completions": "random"}, "filter": {"dataset_size": 4},
        "train": {"params": "lora", "loss": "distill", "lora_r": 4, "lora_alpha": 4, "lora_init_seed": 0,
                  "distill": {"vocabulary": "format"}, "lr": 1e-2, "epochs": 1, "batch_size": 2,
                  "warmup_steps": 1, "seeds": [0, 1], "checkpoint_every": 1},
        "eval": {"kinds": ["animal_prob"], "questions": "held_out", "max_questions": 2, "numbers_prefixed": False,
                 "candidates": ["owl", "dolphin", "cat"]},
    }


def _grid(tmp_path: Path, model: Path, axes: dict | None = None, **over) -> Path:
    (tmp_path / "exp").mkdir(exist_ok=True)
    (tmp_path / "exp" / "base.yaml").write_text(yaml.safe_dump(_base(tmp_path, model)))
    grid = {"name": "g", "experiment": "exp/base.yaml",
            "axes": axes if axes is not None else {"train.lr": [1e-2, 3e-3]}, **over}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


# --- expansion and validation (no Ray) --------------------------------------------------------------

def test_axes_expand_into_ordinary_experiment_files(tmp_path, tiny_model_dir):
    axes = {"train.lr": [1e-2, 3e-3], "teachers.0.trait": ["owl", "cat"],
            "init": {"shared": {}, "other": {"train.lora_init_seed": None, "train.lora_init_seed_offset": 1000}}}
    grid = load_grid(_grid(tmp_path, tiny_model_dir, axes))
    assert len(grid.cells) == 8 and len({c.name for c in grid.cells}) == 8
    first = grid.cells[0]
    assert first.name == "lr-0.01__trait-owl__init-shared"
    assert first.values == {"train.lr": 0.01, "teachers.0.trait": "owl", "init": "shared"}
    other = next(c for c in grid.cells if c.name == "lr-0.003__trait-cat__init-other")
    assert other.cfg.train.lr == 3e-3 and other.cfg.teachers[0].trait == "cat"
    assert other.cfg.train.lora_init_seed is None and other.cfg.train.lora_init_seed_offset == 1000
    assert other.cfg.run_dir == grid.directory / other.name == (tmp_path / "runs" / "g" / other.name).resolve()
    assert not grid.directory.exists()  # loading writes nothing
    write_cells(grid)
    # Each cell file is an ordinary experiment file: `sublab run` would load exactly the cell's config.
    for cell in grid.cells:
        assert load_experiment(cell.path) == cell.cfg
    stamp = other.path.stat().st_mtime_ns
    write_cells(load_grid(grid.path))  # unchanged cells are not rewritten
    assert other.path.stat().st_mtime_ns == stamp


def test_a_preset_axis_sits_under_the_base_file(tmp_path, tiny_model_dir):
    plain, paper = load_grid(_grid(tmp_path, tiny_model_dir, {"preset": [None, "paper"]})).cells
    assert (plain.name, paper.name) == ("preset-none", "preset-paper")
    assert plain.cfg.eval.samples_per_question == 10 and plain.cfg.train.grad_accum == 1
    assert paper.cfg.eval.samples_per_question == 100 and paper.cfg.train.grad_accum == 3  # from the preset
    assert paper.cfg.generate.n_prompts == 4 and paper.cfg.train.seeds == [0, 1]  # the file wins over it
    assert "preset" not in paper.raw and paper.raw["generate"]["n_prompts"] == 4


def test_bad_axes_are_one_line_errors_naming_the_grid_and_axis(tmp_path, tiny_model_dir):
    cases = [
        ({"train.lr": [1e-2, "fast"]}, r"grid\.yaml: axis train\.lr=fast: .*train\.lr"),
        ({"train.lrr": [1e-2]}, r"grid\.yaml: axis train\.lrr=0\.01: .*lrr: unknown key"),
        ({"teachers.5.trait": ["cat"]}, r"grid\.yaml: axis teachers\.5\.trait=cat: .*'teachers' is a list of 2"),
        ({"train.lr": []}, r"grid\.yaml: axis train\.lr: no values"),
        ({"train.lr": 0.1}, r"grid\.yaml: axis train\.lr: expected a list of values"),
        ({"name": ["a", "b"]}, r"grid\.yaml: axis name: 'name' is set by the grid"),
        ({"init": {"bad/name": {}}}, r"grid\.yaml: axis init: variant 'bad/name' is not a safe name"),
        # a cell is one experiment: its trait teachers must share a category (one set of eval questions)
        ({"teachers.1.category": ["animal", "tree"]},
         r"grid\.yaml: axis teachers\.1\.category=tree: teachers: 'owl' is category animal but 'dolphin' is tree"),
    ]
    for axes, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            load_grid(_grid(tmp_path, tiny_model_dir, axes))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"grid\.yaml: experiment: nope\.yaml not found"):
        load_grid(_grid(tmp_path, tiny_model_dir, experiment="nope.yaml"))
    with pytest.raises(ConfigError, match=r"grid\.yaml: axes: empty"):
        load_grid(_grid(tmp_path, tiny_model_dir, axes={}))
    # Values valid alone but not together: the error names the cell.
    axes = {"a": {"x": {"train.lora_init_seed_offset": 1000}}}
    with pytest.raises(ConfigError, match=r"axis a=x: .*lora_init_seed_offset"):
        load_grid(_grid(tmp_path, tiny_model_dir, axes))


def test_names_stay_unique_and_safe(tmp_path, tiny_model_dir):
    grid = load_grid(_grid(tmp_path, tiny_model_dir, {"train.seeds": [[0, 1], [2]], "eval.candidates": [
        ["owl", "dolphin", "a/b"], ["owl", "dolphin", "a_b"]]}))
    names = [c.name for c in grid.cells]
    assert len(set(names)) == 4 and names[0].startswith("seeds-0_1__candidates-owl_dolphin_a_b-")
    assert all("/" not in n and not n.startswith(".") for n in names)


def test_dry_run_plans_without_writing(tmp_path, tiny_model_dir):
    path = _grid(tmp_path, tiny_model_dir, {"train.lr": [1e-2, 3e-3], "train.seeds": [[0, 1], [2, 3, 4]]})
    plan = plan_grid(load_grid(path))
    assert len(plan.cells) == 4 and plan.students == 2 * (4 + 6)
    assert plan.finetuned_teachers == 2 and plan.teacher_mentions == 8  # shared by all cells: built once
    assert plan.cost_s is None and "no measured rate" in plan.notes[0]  # a tiny model has no measured rate
    result = CliRunner().invoke(app, ["grid", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "4 cells (4 to run), 2 fine-tuned teachers" in result.output
    assert not (tmp_path / "runs").exists()
    bad = _grid(tmp_path, tiny_model_dir, {"train.lr": ["fast"]})
    result = CliRunner().invoke(app, ["grid", str(bad), "--dry-run"])
    assert result.exit_code == 1 and "axis train.lr=fast" in result.output


def test_transfer_grid_plans_the_study_cells():
    path = Path(__file__).parents[1] / "experiments" / "transfer" / "grid.yaml"
    plan = plan_grid(load_grid(path))
    assert [c.name for c in plan.cells] == ["init-shared", "init-other"]
    assert [c.students for c in plan.cells] == [20, 12] and plan.finetuned_teachers == 4
    # The measured cell took 47 min (docs/results.md); the estimate should be near it.
    assert 35 * 60 < plan.cells[0].cost_s < 60 * 60
    shared = load_experiment(path.parent / "lora8-shared-init.yaml")
    cells = {c.name: c for c in load_grid(path).cells}
    assert cells["init-shared"].cfg.model_copy(update={"name": shared.name, "runs_dir": shared.runs_dir}) == shared


def test_cells_declare_a_gpu_when_they_run_on_cuda(tmp_path, tiny_model_dir):
    from sublab.grid.engine import _gpus

    cell = load_grid(_grid(tmp_path, tiny_model_dir)).cells[0]
    assert _gpus(cell, None) == 0 and _gpus(cell, 0.5) == 0.5
    cell.cfg = cell.cfg.model_copy(update={"device": "cuda"})
    assert _gpus(cell, None) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_grid_cell_runs_on_the_gpu(ray_cluster_gpu, tmp_path, tiny_model_dir, monkeypatch):
    """A one-cell grid with device: cuda on a local cluster with the GPU: the task gets it and trains there."""
    from sublab.grid import run_grid

    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    grid = load_grid(_grid(tmp_path, tiny_model_dir, {"device": ["cuda"]}))
    outcome = _run_bounded(lambda: run_grid(grid))
    assert outcome.failed == {} and cell_is_done(grid.cells[0])
    log = (grid.directory / "logs" / f"{grid.cells[0].name}.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=0," in log  # Ray gave the task the GPU; the cell's device: cuda used it


# --- on a local Ray cluster -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the module, shut down at its end."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=128 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster_gpu():
    """A local Ray cluster with this machine's GPU (for the `gpu` test), shut down after it."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster without the GPU is already running in this process")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _run_bounded(fn, timeout: float = RAY_TIMEOUT_S):
    """Run `fn` in a thread; fail the test if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"grid run did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _comparable(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("created_at", None)
    return data


@pytest.fixture(scope="module")
def finished_grid(ray_cluster, tmp_path_factory, tiny_model_dir):
    """A two-cell grid run uninterrupted (both cells at once), with its own $SUBLAB_HOME."""
    from sublab.grid import run_grid, write_grid_results

    tmp = tmp_path_factory.mktemp("grid")
    os.environ["SUBLAB_HOME"] = str(tmp / "home")
    try:
        grid = load_grid(_grid(tmp, tiny_model_dir))
        outcome = _run_bounded(lambda: run_grid(grid, workers=2))
        report = write_grid_results(grid)
    finally:
        del os.environ["SUBLAB_HOME"]
    return grid, outcome, report, tmp / "home"


def test_grid_runs_on_ray_and_a_rerun_skips_every_cell(finished_grid):
    from sublab.grid import run_grid

    grid, outcome, report, _ = finished_grid
    assert outcome.failed == {} and sorted(outcome.ran) == sorted(c.name for c in grid.cells)
    for cell in grid.cells:
        assert cell_is_done(cell)
        results = json.loads((cell.cfg.run_dir / "results.json").read_text())
        prob = next(e for e in results["evals"] if e["metric"] == "animal_prob")
        assert prob["comparison"]["n_treatment"] == 2
        assert (grid.directory / "logs" / f"{cell.name}.log").read_text().count("=== finished") == 1
    rows = json.loads((grid.directory / "grid_results.json").read_text())["rows"]
    assert {(r["cell"], r["axes"]["train.lr"]) for r in rows} == {("lr-0.01", 0.01), ("lr-0.003", 0.003)}
    assert all(r["treatment"] is not None and r["report"] == f"{r['cell']}/report.md" for r in rows)
    text = report.read_text()
    assert "[report](lr-0.01/report.md)" in text and "figures/grid_diffs.png" in text
    assert (grid.directory / "figures" / "grid_diffs.png").stat().st_size > 0
    # Two cells that share both teachers built each once: one fine-tune per teacher across both logs.
    logs = "".join((grid.directory / "logs" / f"{c.name}.log").read_text() for c in grid.cells)
    assert logs.count(": fine-tuning ") == 2 and logs.count(": reusing ") >= 2
    # The rerun: every cell finished, so no task runs and no file of a cell changes.
    stamps = {p: p.stat().st_mtime_ns for p in grid.directory.rglob("*") if p.is_file()}
    again = run_grid(load_grid(grid.path), workers=2)
    assert again.ran == {} and sorted(again.skipped) == sorted(c.name for c in grid.cells)
    assert [p for p, t in stamps.items() if p.stat().st_mtime_ns != t] == []
    # The same through the CLI (it uses this process's Ray connection): only the grid's report is rewritten.
    result = CliRunner().invoke(app, ["grid", str(grid.path)])
    assert result.exit_code == 0, result.output
    assert "2 cells (0 to run)" in result.output and "grid report:" in result.output
    changed = {p.relative_to(grid.directory).as_posix() for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed <= {"grid_results.json", "grid_report.md", "figures/grid_diffs.png"}


def test_worker_killed_mid_cell_is_retried_to_the_same_results(finished_grid, tmp_path, tiny_model_dir,
                                                                monkeypatch):
    """Cells one at a time; the second cell's worker is SIGKILLed while it trains (its pid read from the
    cell's run lock). Ray reruns the cell, the pipeline resumes, the first cell is untouched, and every
    result equals the uninterrupted run's. (The teachers come from the reference run's cache: they are
    not what is tested here.)"""
    from sublab.grid import run_grid, write_grid_results

    reference, _, _, home = finished_grid
    monkeypatch.setenv("SUBLAB_HOME", str(home))
    grid = load_grid(_grid(tmp_path, tiny_model_dir))
    first, second = grid.cells
    killed: dict = {}

    def kill_second_mid_training():
        lock = second.cfg.run_dir / ".lock"
        deadline = time.time() + RAY_TIMEOUT_S
        while time.time() < deadline:
            students = second.cfg.run_dir / "students"
            training = students.is_dir() and any(students.iterdir())
            try:  # the holder's JSON is written just after the lock is taken: read it whole or retry
                holder = json.loads(lock.read_text() or "null") if lock.is_file() else None
            except ValueError:
                holder = None
            if training and holder:
                killed["first_mtimes"] = {p: p.stat().st_mtime_ns for p in first.cfg.run_dir.rglob("*")
                                          if p.is_file() and p.name != ".lock"}
                killed["pid"] = holder["pid"]
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_second_mid_training, daemon=True)
    watcher.start()
    outcome = _run_bounded(lambda: run_grid(grid, workers=1))
    watcher.join(5)
    assert "pid" in killed, "the second cell was never caught mid-training"
    assert outcome.failed == {} and set(outcome.ran) == {first.name, second.name}
    assert outcome.attempts[second.name] != [killed["pid"]]  # finished by another worker
    log = (grid.directory / "logs" / f"{second.name}.log").read_text()
    assert log.count("=== /") == 2 and log.count("=== finished") == 1  # two attempts, one finish
    changed = [p for p, t in killed["first_mtimes"].items() if p.stat().st_mtime_ns != t]
    assert changed == []
    write_grid_results(grid)
    for mine, theirs in zip(grid.cells, reference.cells):
        assert _comparable(mine.cfg.run_dir / "results.json") == _comparable(theirs.cfg.run_dir / "results.json")
    rows = json.loads((grid.directory / "grid_results.json").read_text())["rows"]
    assert rows == json.loads((reference.directory / "grid_results.json").read_text())["rows"]


# --- pooled seed cells (no Ray: the cells run in this process) -----------------------------------------

def _mutual(tmp_path: Path, model: Path) -> dict:
    """The study's design at toy scale: two trait teachers, each the other's control, blocked by seed."""
    base = _base(tmp_path, model)
    base["design"] = "mutual"
    base["teachers"][1].pop("control")
    return base


def test_pooled_seed_cells_equal_one_run_of_all_seeds(tmp_path, tiny_model_dir, monkeypatch):
    """A study split into one cell per seed (`pool: [seeds]`) gives, pooled, the results of one `sublab run`
    of every seed: same students' scores, same within-block comparison, blocks and specificity."""
    from sublab.grid import write_grid_results
    from sublab.pipeline import run_all
    from sublab.report import load_results

    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "base.yaml").write_text(yaml.safe_dump(_mutual(tmp_path, tiny_model_dir)))
    whole = load_experiment(tmp_path / "exp" / "base.yaml")
    run_all(whole)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "g", "experiment": "exp/base.yaml", "pool": ["seeds"],
                                         "axes": {"seeds": {"s0": {"train.seeds": [0]},
                                                            "s1": {"train.seeds": [1]}}}}))
    grid = load_grid(grid_file)
    write_cells(grid)
    for cell in grid.cells:
        run_all(load_experiment(cell.path))
    write_grid_results(grid)
    pooled = load_results(grid.directory / "pooled" / "all" / "results.json")
    single = load_results(whole.run_dir / "results.json")
    assert pooled.students == single.students
    assert [e.model_dump(exclude={"rows"}) for e in pooled.evals] == [e.model_dump(exclude={"rows"})
                                                                      for e in single.evals]
    assert (grid.directory / "pooled" / "all" / "report.md").is_file()
    rows = json.loads((grid.directory / "grid_results.json").read_text())["rows"]
    pooled_rows = [r for r in rows if r["cell"] == "pooled/all"]
    assert {r["trait"] for r in pooled_rows} == {"owl", "dolphin"}
    assert all(r["n_treatment"] == 2 and r["axes"] == {"seeds": "pooled"} for r in pooled_rows)
    assert all(r["report"] == "pooled/all/report.md" for r in pooled_rows)


def test_a_pooled_axis_may_only_split_seeds(tmp_path, tiny_model_dir):
    cases = [({"seeds": {"a": {"train.seeds": [0]}}}, ["nope"], "pool: nope: no such axis"),
             ({"train.lr": [1e-2, 3e-3]}, ["train.lr"], "may set only train.seeds"),
             ({"seeds": {"a": {"train.seeds": [0, 1]}, "b": {"train.seeds": [1]}}}, ["seeds"], "share seeds")]
    for axes, pool, expected in cases:
        with pytest.raises(ConfigError, match=expected) as err:
            load_grid(_grid(tmp_path, tiny_model_dir, axes, pool=pool))
        assert "\n" not in str(err.value) and "grid.yaml" in str(err.value)
