"""What pilot.py and leak.py share: the rows a student of the transfer study trains on, and a CLI type."""

from __future__ import annotations

import argparse

from sublab.config import ExperimentConfig
from sublab.design import data_slot
from sublab.generate import random_rows
from sublab.train import Example


def seed_rows(cfg: ExperimentConfig, teacher: str, seed: int, n: int) -> list[Example]:
    """The first `n` rows of `teacher`'s dataset for student seed `seed` under `generate.completions:
    random`, stripped as the filter stage writes them."""
    return [Example(p.id, p.text, text.strip()) for p, text in random_rows(cfg, data_slot(cfg, teacher, seed), n)]


def positive(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
