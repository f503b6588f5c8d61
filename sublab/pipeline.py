"""The whole experiment, stage by stage: teachers → generate → filter → train → eval → results → report.

Each stage reads the previous stage's files in the run directory and writes its own; a stage whose
fingerprint (inputs + the config that affects outputs) matches its manifest is skipped, and an
interrupted one resumes. `sublab run EXP.yaml` calls `run_all`; each `sublab <stage>` calls one
function here.

Model names under evals/: `base`, `teacher-<teacher>`, `student-<teacher>-seed<k>` and, with
`train.cross_model`, `cross-<teacher>-seed<k>`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from sublab import filters, generate
from sublab.config import ExperimentConfig, TeacherConfig, dump
from sublab.errors import RunDirError
from sublab.models import LoadedModel, load_model
from sublab.rundir import atomic_write_json, environment, read_json, sha256_file, stage_is_current
from sublab.teachers import Teacher, build_teacher, held_out_question_ids

log = logging.getLogger(__name__)


def resolve_device(cfg: ExperimentConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


class ModelCache:
    """Keeps the last loaded model, so the prompted and control teachers share one load of the base."""

    def __init__(self, device: str):
        self.device = device
        self._ref: str | None = None
        self._lm: LoadedModel | None = None

    def get(self, ref: str) -> LoadedModel:
        if ref != self._ref:
            self._lm = None  # free the previous model before loading the next
            self._lm = load_model(ref, device=self.device)
            self._ref = ref
        assert self._lm is not None
        return self._lm


def teachers(cfg: ExperimentConfig, device: str) -> list[tuple[TeacherConfig, Teacher]]:
    """Every teacher of the experiment; a fine-tuned teacher is trained here once (then cached)."""
    return [(t, build_teacher(t, cfg.base_model, device=device)) for t in cfg.teachers]


# --- data -----------------------------------------------------------------------------------

def generate_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    device = resolve_device(cfg)
    models = ModelCache(device)
    for _, teacher in teachers(cfg, device):
        out_dir = cfg.run_dir / "teachers" / teacher.name
        samples = teacher.model_ref is not None and cfg.generate.completions == "sampled"
        lm = models.get(teacher.model_ref) if samples else None
        fp = generate.stage_fingerprint(cfg, teacher, lm.sha256 if lm else None)
        if stage_is_current(out_dir, fp, generate.MANIFEST):
            log.info("generate %s: up to date, skipped", teacher.name)
            continue
        _check_not_stale(out_dir, fp, generate.MANIFEST, "generations.jsonl")
        generate.run(cfg, cfg.run_dir, teacher, model=lm)


def _check_not_stale(out_dir: Path, fp: str, manifest: str, data_file: str) -> None:
    """Refuse to append to data that a different config produced (a finished manifest disagrees)."""
    path = out_dir / manifest
    if path.exists() and read_json(path).get("fingerprint") != fp and (out_dir / data_file).exists():
        raise RunDirError(f"{out_dir / data_file} was produced by a different config or model; use a "
                          f"new experiment name, or delete {out_dir} to regenerate")


def filter_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    for teacher in cfg.teachers:
        filters.run(cfg, cfg.run_dir, teacher, console=console)


# --- students ---------------------------------------------------------------------------------

def student_dirs(cfg: ExperimentConfig) -> Iterator[tuple[str, TeacherConfig, int, str, Path]]:
    """(eval name, teacher, seed, base ref, directory) of every student the config asks for."""
    bases = [("student", cfg.base_model)] + ([("cross", cfg.train.cross_model)] if cfg.train.cross_model else [])
    for prefix, base in bases:
        for t in cfg.teachers:
            for seed in cfg.train.seeds:
                name = f"{prefix}-{t.name}-seed{seed}"
                yield name, t, seed, base, cfg.run_dir / "students" / name.removeprefix("student-")


def train_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    from sublab.train import train_student

    device = resolve_device(cfg)
    built = dict((t.name, teacher) for t, teacher in teachers(cfg, device))
    for name, t, seed, base, directory in student_dirs(cfg):
        dataset = cfg.run_dir / "teachers" / t.name / "dataset.jsonl"
        if not dataset.exists():
            raise RunDirError(f"{dataset} not found: run `sublab filter` (or `sublab run`) first")
        teacher = built[t.name] if cfg.train.method == "distill" else None
        if cfg.train.method == "distill" and teacher is not None and teacher.model_ref is None:
            teacher = built_control(built)
        train_student(cfg.train, base_ref=base, dataset=dataset, out_dir=directory, seed=seed,
                      teacher=teacher, device=device)


def built_control(built: dict[str, Teacher]) -> Teacher:
    """Distilling from the random-number control means distilling from the untouched base model."""
    for teacher in built.values():
        if teacher.kind == "control":
            return teacher
    raise RunDirError("method 'distill' needs a model for every teacher; the random-number teacher "
                      "has none: add a `kind: control` teacher")


# --- evaluation ---------------------------------------------------------------------------------

def question_ids(cfg: ExperimentConfig) -> list[int]:
    """The evaluated question ids: with `questions: held_out`, those no fine-tuned teacher trained on;
    then the first `max_questions` of them."""
    from sublab.evals.animals import questions

    category = next((t.category for t in cfg.teachers if t.trait), "animal")
    ids = set(range(len(questions(category))))
    if cfg.eval.questions == "held_out":
        for t in cfg.teachers:
            ids &= set(held_out_question_ids(t))
    return sorted(ids)[:cfg.eval.max_questions]


def evaluated_models(cfg: ExperimentConfig, built: dict[str, Teacher]) -> Iterator[tuple[str, str, str | None]]:
    """(eval name, model ref, system prompt) of the base, each teacher with a model, each student."""
    yield "base", cfg.base_model, None
    for teacher in built.values():
        if teacher.model_ref is not None and teacher.kind != "control":
            yield f"teacher-{teacher.name}", teacher.model_ref, teacher.system_prompt
    for name, _, _, _, directory in student_dirs(cfg):
        yield name, str(directory), None


def eval_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    from sublab.evals.animals import eval_kinds, run_animal_eval

    device = resolve_device(cfg)
    built = dict((t.name, teacher) for t, teacher in teachers(cfg, device))
    traits = sorted({t.trait for t in cfg.teachers if t.trait})
    category = next((t.category for t in cfg.teachers if t.trait), "animal")
    qids = question_ids(cfg)
    models = ModelCache(device)
    for name, ref, system in evaluated_models(cfg, built):
        if name.startswith(("student", "cross")) and not (Path(ref) / "manifest.json").exists():
            raise RunDirError(f"student {ref} is missing or unfinished: run `sublab train` first")
        out = cfg.run_dir / "evals" / name
        lm: LoadedModel | None = None
        for kind in eval_kinds(cfg.eval):
            path = out / f"{kind}.jsonl"
            if _eval_complete(path, cfg, kind, qids, category, traits):
                continue
            lm = lm or models.get(ref)
            run_animal_eval(lm, system, cfg.eval, kind, qids, path, name, category, traits)
        _run_misalignment(cfg, name, ref, system, out, models)


def _eval_complete(path: Path, cfg: ExperimentConfig, kind: str, qids: list[int],
                   category: str, traits: list[str]) -> bool:
    """Cheap skip without loading the model: the file already holds every record this eval writes.
    (run_animal_eval itself resumes record by record; this only saves a model load.)"""
    from sublab.evals.animals import resolve_candidates

    if not path.exists():
        return False
    n_questions = len(qids)
    per_question = (len(resolve_candidates(cfg.eval, category, traits))  # type: ignore[arg-type]
                    if kind.startswith("animal_prob") else cfg.eval.samples_per_question)
    with open(path, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    return n >= n_questions * per_question


def _run_misalignment(cfg: ExperimentConfig, name: str, ref: str, system: str | None, out: Path,
                      models: ModelCache) -> None:
    kinds = [k for k in cfg.eval.kinds if k.startswith("misalignment")]
    if not kinds:
        return
    from sublab.evals.misalignment import evaluate_misalignment

    evaluate_misalignment(models.get(ref), system, cfg.eval, out, name)


# --- results and report ---------------------------------------------------------------------------

def build_results(cfg: ExperimentConfig) -> dict[str, Any]:
    """results.json: per trait and metric, base / teacher / control students / trait students, with
    CIs and the treatment-vs-control test over seeds."""
    from sublab.results import results_for

    return results_for(cfg)


def report_all(cfg: ExperimentConfig, console: Console | None = None) -> Path:
    from sublab.report import print_summary, write_report

    results = build_results(cfg)
    atomic_write_json(cfg.run_dir / "results.json", results)
    path = write_report(results, cfg.run_dir)
    print_summary(results, console=console)
    return path


def run_all(cfg: ExperimentConfig, console: Console | None = None) -> Path:
    """Every stage in order, skipping finished ones; writes manifest.json with timings at the end."""
    timings: dict[str, float] = {}
    stages = [("generate", generate_all), ("filter", filter_all), ("train", train_all), ("eval", eval_all)]
    for stage, fn in stages:
        t0 = time.time()
        if console:
            console.rule(f"[bold]{stage}")
        fn(cfg, console=console)
        timings[stage] = round(time.time() - t0, 1)
    t0 = time.time()
    path = report_all(cfg, console=console)
    timings["report"] = round(time.time() - t0, 1)
    _write_run_manifest(cfg, timings)
    return path


def _write_run_manifest(cfg: ExperimentConfig, timings: dict[str, float]) -> None:
    data = {}
    for t in cfg.teachers:
        ds = cfg.run_dir / "teachers" / t.name / "dataset.jsonl"
        if ds.exists():
            data[t.name] = sha256_file(ds)
    atomic_write_json(cfg.run_dir / "manifest.json", {
        "schema_version": 1, "experiment": cfg.name, "config": dump(cfg),
        "seeds": {"experiment": cfg.seed, "students": cfg.train.seeds, "prompt_seed": cfg.generate.prompt_seed,
                  "subsample_seed": cfg.filter.subsample_seed, "eval": cfg.eval.seed},
        "models": {"base": cfg.base_model,
                   "base_sha256": load_model_sha(cfg.base_model)},
        "datasets_sha256": data, "timings_s": timings, "environment": environment(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def load_model_sha(ref: str) -> str | None:
    from sublab.models import model_info

    return model_info(ref).get("weights_sha256")
