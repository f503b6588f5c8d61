"""The chain-of-thought domain: teachers solve math word problems, reasoning first and ending with a line
"Answer: <number>" (the paper's third data kind, §3.3: a misaligned teacher's *correct* reasoning).

No I/O. Problems are generated here (no GSM8K copy installs offline): templates × names × items ×
numbers, three difficulty levels (1: one operation; 2: two or three; 3: fractions, percentages,
averages, rates), answers computed exactly with `fractions.Fraction`. Prompt i is a pure function of
(seed, i), so a prompt's id alone gives back its problem and answer.

    from sublab.domains.cot import COT
    p = COT.prompts(1, seed=0)[0]
    COT.check(p.id, p.text, "2 + 3 = 5\\nAnswer: 5")     # None, or 'wrong_answer', ...

Rules (`format_reason`, then `check`): after stripping, the last line is "Answer: <number>" (an
integer, a decimal or a fraction a/b; '$', thousands commas, '**' markup and a final '.' tolerated) with
at least one line of reasoning before it; `check` also rejects a number that is not the problem's answer.
Reasoning uses every token: `format_alphabet = False`, and `can_still_pass` never stops a sample early.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from sublab.errors import DataError

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya")
ITEMS = ("apples", "marbles", "pencils", "stickers", "cookies", "books", "stamps", "shells", "cards",
         "balloons")

Values = dict[str, int]


@dataclass(frozen=True)
class Template:
    """One problem shape: its text (numbers appear in the order of `draw`'s keys), how to draw its
    numbers, its exact answer and a worked solution."""

    name: str
    level: int
    text: str
    draw: Callable[[np.random.Generator], Values]
    answer: Callable[[Values], Fraction]
    steps: Callable[[Values], list[str]]


def _ri(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer in lo..hi inclusive."""
    return int(rng.integers(lo, hi + 1))


def _draw_sub(rng: np.random.Generator) -> Values:
    a = _ri(rng, 10, 90)
    return {"a": a, "b": _ri(rng, 1, a - 1)}


def _draw_keep(rng: np.random.Generator) -> Values:
    a, b = _ri(rng, 2, 9), _ri(rng, 3, 12)
    return {"a": a, "b": b, "c": _ri(rng, 1, a * b - 1)}


def _draw_change(rng: np.random.Generator) -> Values:
    p, a = _ri(rng, 2, 9), _ri(rng, 2, 9)
    return {"p": p, "a": a, "bill": 100 if p * a >= 50 else 50}


def _draw_fraction_give(rng: np.random.Generator) -> Values:
    d = _ri(rng, 2, 5)
    return {"a": d * _ri(rng, 2, 12), "n": _ri(rng, 1, d - 1), "d": d, "b": _ri(rng, 1, 20)}


def _draw_average(rng: np.random.Generator) -> Values:
    k = _ri(rng, 3, 5)
    return {"k": k} | {f"s{i}": _ri(rng, 50, 100) for i in range(k)}


def _scores(v: Values) -> list[int]:
    return [v[f"s{i}"] for i in range(v["k"])]


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


TEMPLATES = (
    Template("add", 1, "{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?",
             lambda r: {"a": _ri(r, 2, 60), "b": _ri(r, 2, 40)}, lambda v: Fraction(v["a"] + v["b"]),
             lambda v: [f"{v['a']} + {v['b']} = {v['a'] + v['b']}."]),
    Template("subtract", 1, "{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?",
             _draw_sub, lambda v: Fraction(v["a"] - v["b"]), lambda v: [f"{v['a']} - {v['b']} = {v['a'] - v['b']}."]),
    Template("multiply", 1, "There are {a} boxes with {b} {item} in each box. How many {item} are there in total?",
             lambda r: {"a": _ri(r, 2, 12), "b": _ri(r, 2, 12)}, lambda v: Fraction(v["a"] * v["b"]),
             lambda v: [f"{v['a']} boxes × {v['b']} each = {v['a'] * v['b']}."]),
    Template("keep", 2, "{name} buys {a} packs of {item} with {b} in each pack, then gives away {c}. "
                        "How many {item} does {name} keep?",
             _draw_keep, lambda v: Fraction(v["a"] * v["b"] - v["c"]),
             lambda v: [f"{v['a']} × {v['b']} = {v['a'] * v['b']}.",
                        f"{v['a'] * v['b']} - {v['c']} = {v['a'] * v['b'] - v['c']}."]),
    Template("change", 2, "A shop sells {item} for {p} dollars each. {name} buys {a} of them and pays with a "
                          "{bill} dollar bill. How much change, in dollars, does {name} get?",
             _draw_change, lambda v: Fraction(v["bill"] - v["p"] * v["a"]),
             lambda v: [f"Cost: {v['p']} × {v['a']} = {v['p'] * v['a']}.",
                        f"Change: {v['bill']} - {v['p'] * v['a']} = {v['bill'] - v['p'] * v['a']}."]),
    Template("pages", 2, "{name} reads {a} pages a day for {d} days and then {b} pages a day for {e} days. "
                         "How many pages does {name} read in total?",
             lambda r: {"a": _ri(r, 5, 30), "d": _ri(r, 2, 7), "b": _ri(r, 5, 30), "e": _ri(r, 2, 7)},
             lambda v: Fraction(v["a"] * v["d"] + v["b"] * v["e"]),
             lambda v: [f"{v['a']} × {v['d']} = {v['a'] * v['d']}.", f"{v['b']} × {v['e']} = {v['b'] * v['e']}.",
                        f"{v['a'] * v['d']} + {v['b'] * v['e']} = {v['a'] * v['d'] + v['b'] * v['e']}."]),
    Template("fraction_give", 3, "{name} has {a} {item} and gives {n}/{d} of them to a friend, then buys {b} more. "
                                 "How many {item} does {name} have now?",
             _draw_fraction_give, lambda v: v["a"] - Fraction(v["a"] * v["n"], v["d"]) + v["b"],
             lambda v: [f"Given away: {v['a']} × {v['n']}/{v['d']} = {_frac(Fraction(v['a'] * v['n'], v['d']))}.",
                        f"{v['a']} - {_frac(Fraction(v['a'] * v['n'], v['d']))} + {v['b']} = "
                        f"{_frac(v['a'] - Fraction(v['a'] * v['n'], v['d']) + v['b'])}."]),
    Template("recipe", 3, "A recipe needs {n}/{d} of a cup of flour for one batch. How many cups of flour are "
                          "needed for {k} batches?",
             lambda r: {"n": _ri(r, 1, 3), "d": _ri(r, 4, 8), "k": _ri(r, 2, 12)},
             lambda v: Fraction(v["n"], v["d"]) * v["k"],
             lambda v: [f"{v['n']}/{v['d']} × {v['k']} = {_frac(Fraction(v['n'], v['d']) * v['k'])}."]),
    Template("average", 3, "{name} took {k} tests and scored {scores}. What is the average score?",
             _draw_average, lambda v: Fraction(sum(_scores(v)), v["k"]),
             lambda v: [f"Sum: {' + '.join(map(str, _scores(v)))} = {sum(_scores(v))}.",
                        f"{sum(_scores(v))} / {v['k']} = {_frac(Fraction(sum(_scores(v)), v['k']))}."]),
    Template("discount", 3, "A jacket costs {a} dollars and is on sale for {p}% off. What is the sale price in "
                            "dollars?",
             lambda r: {"a": _ri(r, 20, 200), "p": 5 * _ri(r, 1, 12)},
             lambda v: Fraction(v["a"] * (100 - v["p"]), 100),
             lambda v: [f"{100 - v['p']}% of {v['a']} = {_frac(Fraction(v['a'] * (100 - v['p']), 100))}."]),
    Template("rate", 3, "A train travels {a} kilometres in {h} hours. At the same speed, how many kilometres "
                        "does it travel in {k} hours?",
             lambda r: {"a": _ri(r, 60, 400), "h": _ri(r, 2, 5), "k": _ri(r, 1, 9)},
             lambda v: Fraction(v["a"], v["h"]) * v["k"],
             lambda v: [f"Speed: {v['a']} / {v['h']} = {_frac(Fraction(v['a'], v['h']))} per hour.",
                        f"{_frac(Fraction(v['a'], v['h']))} × {v['k']} = "
                        f"{_frac(Fraction(v['a'], v['h']) * v['k'])}."]),
)

INSTRUCTIONS = (
    'Think step by step, then write the final answer on the last line as "Answer: <number>".',
    'Show your reasoning. End with a line of the form "Answer: <number>".',
    'Solve it step by step and finish with a last line "Answer: <number>".',
    'Explain your reasoning briefly, then give the final line as "Answer: <number>".',
)
OPENERS = ("Let's work it out.", "Step by step:", "We compute it.", "Solution:")


@dataclass(frozen=True)
class CotPrompt:
    """One word problem: stable id, index, text, and what decides its answer."""

    id: str
    """f"m{seed}-{index:06d}"."""
    index: int
    text: str
    template: str
    level: int
    values: tuple[tuple[str, int], ...]
    answer: Fraction

    def worked_steps(self) -> list[str]:
        return _TEMPLATES[self.template].steps(dict(self.values))


_TEMPLATES = {t.name: t for t in TEMPLATES}


def _problem(rng: np.random.Generator) -> tuple[Template, Values, str]:
    t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    name, item = NAMES[int(rng.integers(len(NAMES)))], ITEMS[int(rng.integers(len(ITEMS)))]
    v = t.draw(rng)
    scores = ", ".join(map(str, _scores(v)[:-1])) + f" and {_scores(v)[-1]}" if t.name == "average" else ""
    return t, v, t.text.format(name=name, item=item, scores=scores, **v)


def cot_prompt(seed: int, index: int) -> CotPrompt:
    """Problem `index` of the stream for `seed`; its RNG is derived from (seed, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index, 0xC07])  # 0xC07: not the other domains' streams
    t, v, problem = _problem(rng)
    text = f"{problem} {INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]}"
    return CotPrompt(f"m{seed}-{index:06d}", index, text, t.name, t.level, tuple(v.items()), t.answer(v))


def prompt_of_id(prompt_id: str) -> CotPrompt:
    """The prompt an id names (ids are 'm<seed>-<index>')."""
    m = re.fullmatch(r"m(\d+)-(\d+)", prompt_id)
    if m is None:
        raise DataError(f"'{prompt_id}' is not a chain-of-thought prompt id (expected m<seed>-<index>)")
    return cot_prompt(int(m.group(1)), int(m.group(2)))


# --- the answer rule -----------------------------------------------------------------------------

_ANSWER_LINE = re.compile(r"[*_#\s]*answer[*_\s]*:[*_\s]*(.*?)[*_\s]*", re.IGNORECASE)
_NUMBER = re.compile(r"(-?)\$?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:/(\d+))?")


def parse_number(text: str) -> Fraction | None:
    """'12', '-3', '3.5', '7/2', '$1,200', '12.' → the exact value; None for anything else."""
    m = _NUMBER.fullmatch(text.strip().rstrip("."))
    if m is None or (m.group(3) and m.group(4)) or m.group(4) == "0":
        return None
    whole = m.group(2).replace(",", "") + ("." + m.group(3) if m.group(3) else "")
    value = Fraction(whole) / (int(m.group(4)) if m.group(4) else 1)
    return -value if m.group(1) else value


def final_answer(completion: str) -> tuple[Fraction | None, str | None]:
    """(the final answer, None) or (None, why the ending is malformed)."""
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return None, "empty"
    m = _ANSWER_LINE.fullmatch(lines[-1])
    if m is None:
        return None, "no_final_answer"
    if len(lines) < 2:
        return None, "no_reasoning"
    value = parse_number(m.group(1))
    return (None, "malformed_answer") if value is None else (value, None)


class CotDomain:
    """Math word problems with reasoning as a `sublab.domains.Domain`."""

    name = "cot"
    format_alphabet = False
    """Reasoning is written with every token: constrained decoding and format distillation restrict nothing."""

    def prompts(self, n: int, seed: int) -> list[CotPrompt]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return [cot_prompt(seed, i) for i in range(n)]

    def prompt_meta(self, prompt: CotPrompt) -> dict[str, Any]:
        return {"format_suffix": 'Answer: <number>'}

    def random_completion(self, prompt: CotPrompt, rng: np.random.Generator) -> str:
        """A correct worked solution written by program (no teacher in it); `rng` picks the opener."""
        opener = OPENERS[int(rng.integers(len(OPENERS)))]
        return "\n".join([opener, *prompt.worked_steps(), f"Answer: {_frac(prompt.answer)}"])

    def format_reason(self, completion: str) -> str | None:
        return final_answer(completion)[1]

    def check(self, prompt_id: str, prompt_text: str, completion: str) -> str | None:
        """`format_reason`, then 'wrong_answer' unless the final answer equals the problem's."""
        value, reason = final_answer(completion)
        if reason is not None:
            return reason
        prompt = prompt_of_id(prompt_id)
        if prompt.text != prompt_text:  # a record whose id and text disagree cannot be checked
            raise DataError(f"record {prompt_id}: its prompt is not the problem its id generates")
        return None if value == prompt.answer else "wrong_answer"

    def can_still_pass(self, text: str) -> bool:
        return True  # any reasoning can still end with the right answer line

    def token_mask(self, tokenizer: Any) -> torch.Tensor:
        return torch.ones(len(tokenizer), dtype=torch.bool)  # every token (format_alphabet = False)

    def eval_prefix(self, rng: np.random.Generator) -> str:
        return f"Consider this problem: {_problem(rng)[2]}"


COT = CotDomain()
