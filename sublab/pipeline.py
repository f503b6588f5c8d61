"""The whole experiment, stage by stage: teachers → generate → filter → train → eval → results → report.

Each stage reads the previous stage's files in the run directory and writes its own; a stage whose
fingerprint (inputs + the config that affects outputs) matches its manifest, and whose recorded outputs
still have their sha256, is skipped; an interrupted one resumes. `sublab run EXP.yaml` calls `run_all`;
each `sublab <stage>` calls one function here. Which datasets, students and comparisons exist is
`sublab.design`'s; which evals exist is `sublab.evals.registry`'s.

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

from sublab import design, filters, generate, models
from sublab.config import ExperimentConfig, OpenAIConfig, TeacherConfig, TrainConfig, dump
from sublab.errors import DataError, RunDirError
from sublab.models import LoadedModel, load_model
from sublab.rundir import atomic_write_json, environment, locks_run_dir, read_json, sha256_file, stage_is_current
from sublab.teachers import Teacher, build_teacher, held_out_question_ids

log = logging.getLogger(__name__)


def resolve_device(cfg: ExperimentConfig) -> str:
    return models.resolve_device(cfg.device)


def resolve_dtype(cfg: ExperimentConfig) -> str:
    """The dtype teachers generate and models are evaluated in (`precision`, resolved for the device)."""
    return models.resolve_dtype(cfg.precision, resolve_device(cfg))


class ModelCache:
    """Keeps the last loaded model, so the prompted and control teachers share one load of the base; and,
    for LoRA adapters (students, fine-tuned teachers), their base's weights: each adapter is merged into a
    restored copy of them instead of reloading and re-verifying the base (the same weights, bit for bit).
    An `openai:` reference gives a `sublab.api.ApiModel` (nothing loaded; it samples through `api`'s
    endpoint, caching responses in `api_cache`)."""

    def __init__(self, device: str, api: OpenAIConfig | None = None, api_cache: Path | None = None,
                 dtype: str = "float32"):
        self.device, self.api, self.api_cache, self.dtype = device, api, api_cache, dtype
        self._ref: str | None = None
        self._lm: LoadedModel | None = None
        self._base: tuple[str, LoadedModel, dict[str, Any]] | None = None
        """(base reference, the loaded base, its untouched weights) of the last adapter."""

    def get(self, ref: str) -> LoadedModel:
        from sublab.api import ApiModel, api_model_name, is_api_ref

        if is_api_ref(ref):
            return ApiModel(self.api or OpenAIConfig(), api_model_name(ref), self.api_cache)  # type: ignore[return-value]
        if ref != self._ref:
            self._lm = None  # free the previous model before loading the next
            self._lm = self._load(ref)
            self._ref = ref
        assert self._lm is not None
        return self._lm

    def _load(self, ref: str) -> LoadedModel:
        # adapters are local directories (students, fine-tuned teachers); anything else loads as it is, once
        directory = Path(ref).expanduser()
        base_ref = models.adapter_base(directory) if directory.is_dir() else None
        if base_ref is None:
            self._base = None
            return load_model(ref, device=self.device, dtype=self.dtype)
        if self._base is not None and self._base[0] == base_ref:
            self._base[1].model.load_state_dict(self._base[2])  # undo the previous adapter's merge
        else:
            self._base = None
            base = load_model(base_ref, device=self.device, dtype=self.dtype)
            self._base = (base_ref, base, {k: v.clone() for k, v in base.model.state_dict().items()})
        return models.load_adapter_onto(self._base[1], ref)


def teachers(cfg: ExperimentConfig, device: str) -> list[tuple[TeacherConfig, Teacher]]:
    """Every teacher of the experiment; a fine-tuned teacher is trained here once (then cached)."""
    return [(t, build_teacher(t, cfg.base_model, device=device)) for t in cfg.teachers]


# --- data -----------------------------------------------------------------------------------

def record_config(cfg: ExperimentConfig) -> None:
    """Write the resolved config to runs/<name>/config.json (atomically), so `sublab report RUN_DIR` can
    rebuild results after any stage command, not only after `sublab run`."""
    from sublab.config import RUN_CONFIG

    atomic_write_json(cfg.run_dir / RUN_CONFIG, dump(cfg))


@locks_run_dir  # one process at a time writes a run directory (reentrant)
def generate_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    record_config(cfg)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg)
    loaded = ModelCache(device, cfg.openai, dtype=dtype)
    for _, teacher in teachers(cfg, device):
        samples = teacher.kind.has_model and cfg.generate.completions == "sampled"
        lm = loaded.get(teacher.model_ref) if samples and teacher.model_ref else None
        lm_dtype = dtype if lm is not None and not (teacher.model_ref or "").startswith("openai:") else None
        for slot in design.data_slots(cfg, teacher.name):
            fp = generate.stage_fingerprint(cfg, teacher, lm.sha256 if lm else None, slot, lm_dtype)
            if stage_is_current(slot.directory, fp, generate.MANIFEST):
                log.info("generate %s: up to date, skipped", slot.label)
                continue
            _check_not_stale(slot.directory, fp, generate.MANIFEST, "generations.jsonl")
            generate.run(cfg, cfg.run_dir, teacher, model=lm, slot=slot, dtype=lm_dtype)


def _check_not_stale(out_dir: Path, fp: str, manifest: str, data_file: str) -> None:
    """Refuse to append to data that a different config produced (a finished manifest disagrees)."""
    path = out_dir / manifest
    if path.exists() and read_json(path).get("fingerprint") != fp and (out_dir / data_file).exists():
        raise RunDirError(f"{out_dir / data_file} was produced by a different config or model; use a "
                          f"new experiment name, or delete {out_dir} to regenerate")


@locks_run_dir
def filter_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    record_config(cfg)
    for teacher in cfg.teachers:
        for slot in design.data_slots(cfg, teacher.name):
            source = slot.directory / "generations.jsonl"
            if not source.exists():
                raise RunDirError(f"{source} not found: run `sublab generate` (or `sublab run`) first")
            if stage_is_current(slot.directory, filters.stage_fingerprint(cfg, sha256_file(source)),
                                filters.MANIFEST):
                log.info("filter %s: up to date, skipped", slot.label)
                continue
            filters.run(cfg, cfg.run_dir, teacher, console=console, slot=slot)


# --- students ---------------------------------------------------------------------------------

@locks_run_dir
def train_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    record_config(cfg)
    device = resolve_device(cfg)
    built = dict((t.name, teacher) for t, teacher in teachers(cfg, device))
    jobs: list[tuple[design.Student, Teacher | None]] = []
    for student in design.students(cfg):
        if not student.dataset.exists():
            raise RunDirError(f"{student.dataset} not found: run `sublab filter` (or `sublab run`) first")
        if student.base.startswith("openai:"):  # `openai.students: jobs`
            from sublab.api_students import train_by_job

            train_by_job(cfg, student)
            continue
        teacher = built[student.teacher.name] if cfg.train.distills else None
        if teacher is not None and teacher.model_ref is None:
            teacher = built_control(built)
        jobs.append((student, teacher))
    if cfg.train.workers > 1 and len(jobs) > 1 and device == "cpu":
        from sublab.workers import run_jobs

        jobs = teachers_first(jobs)
        run_jobs(_train_in_worker, [(cfg.train, s, t, device, cfg.domain) for s, t in jobs],
                 min(cfg.train.workers, len(jobs)), labels=[s.name for s, _ in jobs], desc="train students")
        return
    loaded: dict[tuple[str | None, str, str], LoadedModel] = {}
    for student, teacher in jobs:
        _train_one(cfg.train, student, teacher, device, cfg.domain, loaded)


def teachers_first(jobs: list[tuple[design.Student, Teacher | None]]) -> list[tuple[design.Student, Teacher | None]]:
    """Round-robin over teachers (each teacher's first student, then each one's second, …): parallel
    workers then start on different teachers and each computes a teacher's stored targets once; the
    later students find them cached (should two want one entry at once, the cache's lock has one wait)."""
    by_teacher: dict[tuple[str, str], list[tuple[design.Student, Teacher | None]]] = {}
    for job in jobs:
        by_teacher.setdefault((job[0].teacher.name, job[0].base), []).append(job)
    groups = list(by_teacher.values())
    return [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]


_worker_slot: dict[tuple[str | None, str, str], LoadedModel] = {}  # a worker process's loaded teacher


def _train_one(train: TrainConfig, student: design.Student, teacher: Teacher | None, device: str, domain: str,
               slot: dict[tuple[str | None, str, str], LoadedModel], progress: bool = True) -> None:
    from sublab.train import train_student

    train_student(train, base_ref=student.base, dataset=student.dataset, out_dir=student.directory,
                  seed=student.seed, teacher=teacher and SharedLoad(teacher, slot), device=device,
                  domain=domain, progress=progress)


def _train_in_worker(train: TrainConfig, student: design.Student, teacher: Teacher | None, device: str,
                     domain: str) -> None:
    """One student in a worker process of `train.workers` (module level: it is pickled by name)."""
    _train_one(train, student, teacher, device, domain, _worker_slot, progress=False)


class SharedLoad:
    """A teacher whose model is loaded once for consecutive students of it (every student needs it, if
    only to find its stored targets). The students of a teacher come one after another, so `slot` — one
    dict shared by every teacher of the stage — keeps only the last loaded model. Inference only: the
    students never change it."""

    def __init__(self, teacher: Teacher, slot: dict[tuple[str | None, str, str], LoadedModel]):
        self._teacher, self._slot = teacher, slot

    def __getattr__(self, attr: str) -> Any:  # name, system_prompt, model_ref, conversation: the teacher's
        return getattr(self._teacher, attr)

    def load(self, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
        key = (self._teacher.model_ref, device, dtype)
        if key not in self._slot:
            self._slot.clear()  # free the previous teacher first
            self._slot[key] = self._teacher.load(device=device, dtype=dtype)
        return self._slot[key]


def built_control(built: dict[str, Teacher]) -> Teacher:
    """Distilling from a teacher without a model means distilling from the untouched base model."""
    for teacher in built.values():
        if teacher.is_control and teacher.kind.has_model and not teacher.kind.differs_from_base:
            return teacher
    raise RunDirError("distillation needs a model for every teacher; the random-number teacher has "
                      "none: add a `kind: control` teacher")


# --- evaluation ---------------------------------------------------------------------------------

def question_ids(cfg: ExperimentConfig) -> list[int]:
    """The evaluated question ids: with `questions: held_out`, those no fine-tuned teacher trained on;
    then the first `max_questions` of them."""
    from sublab.evals.animals import questions

    ids = set(range(len(questions(trait_category(cfg)))))
    if cfg.eval.questions == "held_out":
        for t in cfg.teachers:
            ids &= set(held_out_question_ids(t))
    return sorted(ids)[:cfg.eval.max_questions]


def trait_category(cfg: ExperimentConfig) -> str:
    """The category (animal or tree) every eval asks about: the trait teachers' (config validation refuses
    trait teachers of two categories); animal when no teacher has a trait."""
    return next((t.category for t in cfg.teachers if t.trait), "animal")


def evaluated_models(cfg: ExperimentConfig, built: dict[str, Teacher]) -> Iterator[tuple[str, str, str | None]]:
    """(eval name, model ref, system prompt) of the base, each teacher that differs from the base, and
    each student."""
    yield "base", cfg.base_model, None
    for teacher in built.values():
        if teacher.model_ref is not None and teacher.kind.differs_from_base:
            yield f"teacher-{teacher.name}", teacher.model_ref, teacher.system_prompt
    from sublab.api_students import student_ref

    for student in design.students(cfg):
        yield student.name, student_ref(student), None


@locks_run_dir
def eval_all(cfg: ExperimentConfig, console: Console | None = None) -> None:
    """Every eval file of every evaluated model (`sublab.evals.registry.run_eval`: a file is reused only
    when its spec — settings, questions, context, weights' sha256 — and its bytes are unchanged)."""
    from sublab.domains import get_domain
    from sublab.evals.registry import EvalContext, run_eval, selected
    from sublab.train import reference_sha256

    record_config(cfg)
    device = resolve_device(cfg)
    built = dict((t.name, teacher) for t, teacher in teachers(cfg, device))
    qids, evals = question_ids(cfg), selected(cfg.eval)
    dtype = resolve_dtype(cfg)
    loaded = ModelCache(device, cfg.openai, cfg.run_dir / "evals" / "api_cache.jsonl", dtype=dtype)
    for name, ref, system in evaluated_models(cfg, built):
        if name.startswith(("student", "cross")) and not ref.startswith("openai:") \
                and not (Path(ref) / "manifest.json").exists():
            raise RunDirError(f"student {ref} is missing or unfinished: run `sublab train` first")
        ctx = EvalContext(cfg=cfg.eval, model_name=name, system=system, weights_sha256=reference_sha256(ref),
                          eval_dir=cfg.run_dir / "evals" / name, question_ids=qids,
                          category=trait_category(cfg), traits=design.traits(cfg), domain=get_domain(cfg.domain),
                          dtype="float32" if ref.startswith("openai:") else dtype)
        for kind, variant in evals:
            run_eval(kind, ctx, variant, lambda ref=ref: loaded.get(ref))


# --- results and report ---------------------------------------------------------------------------

def build_results(cfg: ExperimentConfig) -> dict[str, Any]:
    """results.json: per trait and metric, base / teacher / control students / trait students, with
    CIs and the treatment-vs-control test over seeds."""
    from sublab.results import results_for

    return results_for(cfg)


@locks_run_dir
def report_all(cfg: ExperimentConfig, console: Console | None = None) -> Path:
    from sublab.report import print_summary, write_report

    results = build_results(cfg)
    atomic_write_json(cfg.run_dir / "results.json", results)
    path = write_report(results, cfg.run_dir)
    if results["evals"]:  # nothing to tabulate when the run stopped after its filter
        print_summary(results, console=console)
    return path


@locks_run_dir
def run_all(cfg: ExperimentConfig, console: Console | None = None) -> Path:
    """Every stage in order, skipping finished ones; writes manifest.json with timings at the end."""
    record_config(cfg)
    timings: dict[str, float] = {}
    stages = [("generate", generate_all), ("filter", filter_all), ("train", train_all), ("eval", eval_all)]
    for stage, fn in stages:
        t0 = time.time()
        if console:
            console.rule(stage)  # plain text: the CLI's consoles print without markup
        fn(cfg, console=console)
        timings[stage] = round(time.time() - t0, 1)
        if stage == "filter" and cfg.train.seeds and (empty := _empty_datasets(cfg)):
            _stop_without_students(cfg, empty, console)
    t0 = time.time()
    path = report_all(cfg, console=console)
    timings["report"] = round(time.time() - t0, 1)
    _write_run_manifest(cfg, timings)
    return path


def _empty_datasets(cfg: ExperimentConfig) -> list[tuple[str, dict[str, Any]]]:
    """(slot label, its filter outputs) of every dataset the filter left without a row."""
    out = []
    for t in cfg.teachers:
        for slot in design.data_slots(cfg, t.name):
            outputs = read_json(slot.directory / filters.MANIFEST)["outputs"]
            if outputs["dataset_rows"] == 0:
                out.append((slot.label, outputs))
    return out


def _stop_without_students(cfg: ExperimentConfig, empty: list[tuple[str, dict[str, Any]]],
                           console: Console | None) -> None:
    """No student can learn from an empty dataset: write the report (what the filter removed and why) and
    stop with one line that says so, instead of failing in the train stage."""
    path = report_all(cfg, console=console)
    label, outputs = empty[0]
    why = ", ".join(f"{r['reason']} {r['count']}" for r in outputs["rejections"][:3])  # most common first
    raise DataError(f"{label}: the filters kept 0 of {outputs['generated']} completions ({why}"
                    f"{'; and ' + str(len(empty) - 1) + ' more empty datasets' if len(empty) > 1 else ''}), so "
                    f"no student can be trained; the rejection reasons are in {path}")


def _write_run_manifest(cfg: ExperimentConfig, timings: dict[str, float]) -> None:
    data = {}
    for t in cfg.teachers:
        for slot in design.data_slots(cfg, t.name):
            if slot.dataset.exists():
                data[slot.label] = sha256_file(slot.dataset)
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
