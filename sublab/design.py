"""The experiment's design: which datasets exist, which students are trained on which, and who is
compared with whom. Paths only — nothing is read or written here; the pipeline and `sublab.results`
both ask this module, so a run's layout and its statistics cannot disagree.

Datasets. One per teacher under `teachers/<t>/`, or with `generate.per_seed_data` one per teacher and
student seed under `teachers/<t>/seed<k>/` (prompts from `prompt_seed + k`, random completions from
`seed + k`).

Students. `students/<t>-seed<k>/` (evals/ name `student-<t>-seed<k>`) per teacher and seed, and with
`train.cross_model` `students/cross-<t>-seed<k>/` (`cross-<t>-seed<k>`).

Comparisons (`arms`). design `control`: each trait teacher's students against the control teachers'
students. design `mutual`: each teacher's students against the other teachers' students; students of
one seed form a block (same rows when completions are random, same init and order), so the test permutes
within blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sublab.config import ExperimentConfig, TeacherConfig


@dataclass(frozen=True)
class DataSlot:
    """One dataset of one teacher: where it lives and the seeds that draw it."""

    teacher: str
    directory: Path
    prompt_seed: int
    completion_seed: int
    """Seeds the random completions (`generate.completions: random`, the random teacher)."""
    student_seed: int | None = None
    """The student seed it belongs to (per-seed data), or None (shared by all the teacher's students)."""

    @property
    def dataset(self) -> Path:
        return self.directory / "dataset.jsonl"

    @property
    def label(self) -> str:
        return self.teacher if self.student_seed is None else f"{self.teacher} seed {self.student_seed}"


def data_slots(cfg: ExperimentConfig, teacher: str) -> list[DataSlot]:
    """Every dataset `teacher` writes."""
    root = cfg.run_dir / "teachers" / teacher
    g = cfg.generate
    if not g.per_seed_data:
        return [DataSlot(teacher, root, g.prompt_seed, cfg.seed)]
    return [DataSlot(teacher, root / f"seed{k}", g.prompt_seed + k, cfg.seed + k, k) for k in cfg.train.seeds]


def data_slot(cfg: ExperimentConfig, teacher: str, student_seed: int) -> DataSlot:
    """The dataset the student of `teacher` with `student_seed` trains on."""
    slots = data_slots(cfg, teacher)
    return slots[0] if slots[0].student_seed is None else next(s for s in slots if s.student_seed == student_seed)


@dataclass(frozen=True)
class Student:
    """One student: its evals/ name, its teacher, seed, base model, directory and dataset."""

    name: str
    teacher: TeacherConfig
    seed: int
    base: str
    directory: Path
    dataset: Path
    cross: bool = False
    """Trained on another base model (`train.cross_model`): a cross-model control."""


def students(cfg: ExperimentConfig) -> Iterator[Student]:
    """Every student the config asks for (same-base first, then cross-model)."""
    # An openai: base is sampled through its endpoint; its students train on the same weights held locally.
    # With `openai.students: jobs` they are fine-tuning jobs on the endpoint instead (`sublab.api_students`).
    local = cfg.base_model.startswith("openai:") and cfg.openai.students == "local"
    own = cfg.openai.local_weights if local else cfg.base_model
    bases = [("student", own)] + ([("cross", cfg.train.cross_model)] if cfg.train.cross_model else [])
    for prefix, base in bases:
        for t in cfg.teachers:
            for seed in cfg.train.seeds:
                name = f"{prefix}-{t.name}-seed{seed}"
                yield Student(name, t, seed, base, cfg.run_dir / "students" / name.removeprefix("student-"),
                              data_slot(cfg, t.name, seed).dataset, prefix == "cross")


def student_names(cfg: ExperimentConfig, teacher: TeacherConfig, cross: bool = False) -> list[str]:
    """The evals/ names of `teacher`'s students, in seed order."""
    return [s.name for s in students(cfg) if s.teacher.name == teacher.name and s.cross == cross]


@dataclass(frozen=True)
class Arm:
    """One comparison: the trait teacher's students against its controls' students."""

    treatment: TeacherConfig
    controls: list[TeacherConfig]
    blocked: bool
    """Students pair up by seed (design `mutual`): compare within blocks."""

    @property
    def trait(self) -> str:
        return self.treatment.trait or ""


def trait_teachers(cfg: ExperimentConfig) -> list[TeacherConfig]:
    """Teachers whose trait is measured (every teacher with a trait that is not a control)."""
    return [t for t in cfg.teachers if t.trait and not t.is_control]


def arms(cfg: ExperimentConfig) -> list[Arm]:
    """Every treatment-vs-control comparison of the design."""
    if cfg.design == "mutual":
        return [Arm(t, [o for o in cfg.teachers if o.name != t.name], True) for t in cfg.teachers]
    controls = [t for t in cfg.teachers if t.is_control]
    return [Arm(t, controls, False) for t in trait_teachers(cfg)]


def traits(cfg: ExperimentConfig) -> list[str]:
    """Every trait of the experiment, sorted (all are scored for every model)."""
    return sorted({t.trait for t in cfg.teachers if t.trait})
