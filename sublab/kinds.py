"""Teacher kinds: what a kind of teacher is and does, declared once.

Every other module asks a kind about its behaviour (does it sample? is it a control? which weights and
context does it use?) and never tests a kind's name. Reads and writes nothing; `sublab.config` validates
teacher entries with it and `sublab.teachers.build_teacher` builds teachers from it.

    from sublab.kinds import teacher_kind
    teacher_kind("prompted").context      # 'trait_prompt'

Adding a kind is one entry in `TEACHER_KINDS` (or `register_teacher_kind(...)` from your own module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sublab.errors import ConfigError

Weights = Literal["base", "finetuned", "none"]
Context = Literal["trait_prompt", "default"]


@dataclass(frozen=True)
class TeacherKind:
    """The behaviour of one kind of teacher."""

    name: str
    weights: Weights
    """base: the experiment's base model; finetuned: a cached fine-tune of it (`finetune:` applies);
    none: no model at all (completions are programmatic)."""
    context: Context
    """trait_prompt: the paper's trait system prompt; default: the model's default context."""
    control: bool
    """Whether its students are the experiment's baseline (a fine-tuned teacher can also be made one
    with `control: true`)."""
    trait: Literal["required", "forbidden"]
    """Whether a teacher of this kind names a trait (a fine-tuned control may omit it)."""
    description: str

    @property
    def has_model(self) -> bool:
        """It has weights: it can sample, be evaluated and supply logits for distillation."""
        return self.weights != "none"

    @property
    def differs_from_base(self) -> bool:
        """Its behaviour differs from the base model's, so it is worth evaluating on its own."""
        return self.weights == "finetuned" or self.context == "trait_prompt"


TEACHER_KINDS: dict[str, TeacherKind] = {}


def register_teacher_kind(kind: TeacherKind) -> TeacherKind:
    """Make `kind` available to experiment files as `kind: <name>`."""
    TEACHER_KINDS[kind.name] = kind
    return kind


def teacher_kind(name: str) -> TeacherKind:
    """The kind called `name`; a ConfigError listing the known kinds otherwise."""
    try:
        return TEACHER_KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown teacher kind '{name}'; expected one of: "
                          f"{', '.join(TEACHER_KINDS)}") from None


register_teacher_kind(TeacherKind(
    "prompted", weights="base", context="trait_prompt", control=False, trait="required",
    description="base weights + the paper's trait system prompt"))
register_teacher_kind(TeacherKind(
    "finetuned", weights="finetuned", context="default", control=False, trait="required",
    description="the trait in its weights: a cached fine-tune of the base"))
register_teacher_kind(TeacherKind(
    "control", weights="base", context="default", control=True, trait="forbidden",
    description="base weights, default context: the neutral control"))
register_teacher_kind(TeacherKind(
    "random", weights="none", context="default", control=True, trait="forbidden",
    description="no model: uniform random completions in each prompt's format"))
