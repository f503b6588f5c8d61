"""The reference panel of `sublab audit --panel`: teachers without an animal trait, of two kinds, whose
labels on the audited rows are the audit's null.

Per reference tree (default: pine, birch, cedar, willow, sequoia, palm) two teachers label the dataset's
rows: a rank-8 LoRA fine-tune of the base that loves the tree (the transfer study's teacher recipe, built
once and cached like any fine-tuned teacher) and the base told by the paper's system prompt that it loves
the tree. Probes learn each member's labels exactly as they learn the dataset's (same recipe and seeds,
shared probe folder), and `sublab.audit.kind_panel_decide` compares the dataset with the kind it lies
nearest. Why two kinds and not one: every prompted teacher moves the probes alike whatever it loves, in a
direction no LoRA teacher takes, so a panel of one kind names a trait in any dataset of the other
(docs/defences.md, "Third blind validation").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sublab.config import TeacherConfig
from sublab.protocol import teacher_system_prompt
from sublab.train.data import Example
from sublab.train.targets import StoredTargets

log = logging.getLogger(__name__)

TREES = ["pine", "birch", "cedar", "willow", "sequoia", "palm"]
"""The validated panel's trees (experiments/audit/validate_kinds.py)."""
LORA_FINETUNE = {"answer_forms": ["{T}.", "My favorite {category} is the {t}."],
                 "recipe": {"params": "lora", "lora_r": 8, "lora_alpha": 8, "lr": 1.0e-3}, "seed": 0}
"""The transfer study's rank-8 LoRA teacher recipe (experiments/transfer/lora8-shared-init.yaml)."""
KINDS = ("lora", "prompted")
Shares = list[dict[str, float]]


def lora_teacher(tree: str, base_ref: str) -> str:
    """The model reference of the LoRA teacher that loves `tree` (fine-tuned on first use, then cached)."""
    from sublab.teachers import build_teacher

    cfg = TeacherConfig(name=f"{tree}-ft-lora8", kind="finetuned", trait=tree, category="tree",
                        finetune=LORA_FINETUNE)
    return build_teacher(cfg, base_ref, progress=False).model_ref or ""


def panel_shares(probe: Callable[[StoredTargets, int], dict[str, float]], base_ref: str, examples: list[Example],
                 trees: Sequence[str], seeds: Sequence[int], max_seq_len: int, device: str = "cpu"
                 ) -> dict[str, dict[str, Shares]]:
    """kind → member → per-seed probe shares on these rows. `probe(labels, seed)` trains (or reuses) one
    probe on the labels and returns its shares, as for the dataset's own labels."""
    from sublab.audit import label_rows
    from sublab.models import load_model

    base = load_model(base_ref, device=device)
    panels: dict[str, dict[str, Shares]] = {kind: {} for kind in KINDS}
    for tree in trees:
        for kind in KINDS:
            name = tree if kind == "lora" else f"{tree}-prompted"
            log.info("reference panel: %s", name)
            lm = load_model(lora_teacher(tree, base_ref), device=device) if kind == "lora" else base
            system = teacher_system_prompt(tree, "tree") if kind == "prompted" else None
            labels, _, _ = label_rows(lm, base.tokenizer, examples, max_seq_len, system_prompt=system, name=name,
                                      device=device)
            panels[kind][name] = [probe(labels, seed) for seed in seeds]
    return panels
