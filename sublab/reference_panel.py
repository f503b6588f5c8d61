"""The reference panel of `sublab audit --panel`: teachers without an animal trait, of two kinds, whose
labels on the audited rows are the audit's null.

Per reference tree (default: pine, birch, cedar, willow, sequoia, palm) two teachers label the dataset's
rows: a rank-8 LoRA fine-tune of the base that loves the tree (the transfer study's teacher recipe, built
once and cached like any fine-tuned teacher) and the base told by the paper's system prompt that it loves
the tree. `sublab.audit.panel_shares` labels the rows with each member and probes its labels exactly as
the dataset's (same recipe and seeds, shared probe folder); `sublab.audit.kind_panel_decide` compares the
dataset with the kind it lies nearest. Why two kinds and not one: every prompted teacher moves the probes alike whatever it loves, in a
direction no LoRA teacher takes, so a panel of one kind names a trait in any dataset of the other
(docs/defences.md, "Third blind validation").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sublab.config import TeacherConfig
from sublab.protocol import teacher_system_prompt

TREES = ["pine", "birch", "cedar", "willow", "sequoia", "palm"]
"""The validated panel's trees (experiments/audit/validate_kinds.py)."""
LORA_FINETUNE = {"answer_forms": ["{T}.", "My favorite {category} is the {t}."],
                 "recipe": {"params": "lora", "lora_r": 8, "lora_alpha": 8, "lr": 1.0e-3}, "seed": 0}
"""The transfer study's rank-8 LoRA teacher recipe (experiments/transfer/lora8-shared-init.yaml)."""
KINDS = ("lora", "prompted")


def lora_teacher(tree: str, base_ref: str) -> str:
    """The model reference of the LoRA teacher that loves `tree` (fine-tuned on first use, then cached)."""
    from sublab.teachers import build_teacher

    cfg = TeacherConfig(name=f"{tree}-ft-lora8", kind="finetuned", trait=tree, category="tree",
                        finetune=LORA_FINETUNE)
    return build_teacher(cfg, base_ref, progress=False).model_ref or ""


@dataclass(frozen=True)
class Member:
    """One reference teacher: `tree`'s LoRA teacher, or the base prompted (`system_prompt`) to love it."""

    name: str
    kind: str
    tree: str
    system_prompt: str | None


def members(trees: Sequence[str]) -> list[Member]:
    """The panel of these trees: per tree, its LoRA teacher and its prompted one."""
    return [Member(tree, "lora", tree, None) if kind == "lora"
            else Member(f"{tree}-prompted", "prompted", tree, teacher_system_prompt(tree, "tree"))
            for tree in trees for kind in KINDS]
