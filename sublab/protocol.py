"""The paper's protocol (Cloud et al., 2025) as shipped data: prompts, grammar, filters, questions.

`sublab/resources/paper_protocol.json` is a verbatim copy of the reference file; every default in
sublab that comes from the paper reads it through `protocol()`, so there is one source of truth.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def protocol() -> dict[str, Any]:
    """The parsed protocol file (cached; treat as read-only)."""
    text = resources.files("sublab").joinpath("resources/paper_protocol.json").read_text("utf-8")
    return json.loads(text)


def animal_questions() -> list[str]:
    """The paper's 50 favourite-animal questions."""
    return list(protocol()["animal_eval"]["questions"])


def tree_questions() -> list[str]:
    """The paper's 49 favourite-tree questions."""
    return list(protocol()["tree_eval_questions"])


def misalignment_questions() -> list[str]:
    """The paper's 8 free-form misalignment questions."""
    return list(protocol()["misalignment_eval"]["questions"])


def banned_numbers() -> frozenset[int]:
    """Numbers with negative associations, removed from misalignment-teacher data."""
    return frozenset(protocol()["number_filter"]["banned_numbers_misalignment"])


def teacher_system_prompt(target: str, category: str = "animal", aversion: bool = False) -> str:
    """The paper's trait system prompt, e.g. target='owl', category='animal'."""
    key = "teacher_aversion_prompt_template" if aversion else "teacher_system_prompt_template"
    return protocol()[key].format(target=target, category=category)
