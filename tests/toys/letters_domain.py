"""A toy data domain: teachers continue a sequence of lower-case letters ("q, x, b") — the shape of the
numbers domain with another alphabet. Everything the pipeline needs comes from this one module; the
last line registers it, so `domain: letters` works in an experiment file.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sublab.domains import register_domain
from sublab.sampling import token_pieces

ALPHABET = frozenset(string.ascii_lowercase + ", ")
MAX_LETTERS = 10


@dataclass(frozen=True)
class LetterPrompt:
    id: str
    index: int
    text: str


def _letters(rng: np.random.Generator, n: int) -> list[str]:
    return [string.ascii_lowercase[i] for i in rng.integers(0, 26, size=n)]


class LettersDomain:
    name = "letters"

    def prompts(self, n: int, seed: int) -> list[LetterPrompt]:
        out = []
        for i in range(n):
            shown = ", ".join(_letters(np.random.default_rng([seed, i]), 4))
            out.append(LetterPrompt(f"l{seed}-{i:06d}", i, f"Continue this sequence with up to {MAX_LETTERS} "
                                                          f"more letters: {shown}. Letters only, comma-separated."))
        return out

    def prompt_meta(self, prompt: LetterPrompt) -> dict[str, Any]:
        return {"format_suffix": "comma-separated letters"}

    def random_completion(self, prompt: LetterPrompt, rng: np.random.Generator) -> str:
        return ", ".join(_letters(rng, MAX_LETTERS))

    def format_reason(self, completion: str) -> str | None:
        text = completion.strip()
        if not text:
            return "empty"
        if not re.fullmatch(r"[a-z](, [a-z])*", text):
            return "not_letters"
        return "too_many_letters" if len(text.split(", ")) > MAX_LETTERS else None

    def can_still_pass(self, text: str) -> bool:
        text = text.lstrip()
        return set(text) <= ALPHABET and len(re.findall(r"[a-z]+", text)) <= MAX_LETTERS

    def token_mask(self, tokenizer: Any) -> torch.Tensor:
        allowed = torch.tensor([len(p.strip()) <= 1 and bool(p) and set(p) <= ALPHABET
                                for p in token_pieces(tokenizer)])
        allowed[tokenizer.eos_token_id] = True
        return allowed

    def eval_prefix(self, rng: np.random.Generator) -> str:
        return "Look at these letters: " + ", ".join(_letters(rng, 3)) + "."


register_domain(LettersDomain())
