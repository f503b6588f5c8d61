"""The paper's number-sequence domain: prompt grammar, parse rules, a random-number control, the
shuffled-numbers ablation (`shuffle_numbers`), and the `numbers` data domain (`NUMBERS`) the pipeline asks.

Reads only the protocol file (`protocol()["number_prompts"]` and `["number_filter"]`); writes nothing.

    from sublab.domains.numbers import number_prompts, parse_completion
    prompts = number_prompts(30_000, seed=0)       # prompt i depends only on (seed, i)
    parse_completion("  [123, 456, 789].\n")       # -> [123, 456, 789]

Parse rules (Cloud et al. 2025, appendix; `protocol()["number_filter"]["rules"]`) apply to the text
as given. Pipeline choice: sublab strips a completion's surrounding whitespace before parsing
(`parse_completion`), because chat templates and samplers often leave a trailing newline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from sublab.errors import DataError
from sublab.protocol import protocol
from sublab.sampling import token_pieces

EXAMPLE_COUNT = (3, 8)  # inclusive; the paper's code draws integers(3, 9)
EXAMPLE_VALUE = (100, 999)  # inclusive
MAX_ANSWER_NUMBERS = 10
MAX_ANSWER_VALUE = 999

PARSE_REASONS = ("no_numbers", "single_number_with_text", "bad_separator", "empty_part",
                 "non_digit_part", "too_many_numbers", "number_out_of_range")


@cache
def _grammar() -> dict[str, Any]:
    return protocol()["number_prompts"]


# --- prompts -------------------------------------------------------------------------------------

class NumberPrompt(BaseModel):
    """One user prompt of the paper's grammar, with the choices that built it (indices into the lists)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    """Stable id, f"p{seed}-{index:06d}"."""
    seed: int
    index: int
    text: str
    """The full prompt: example part, instruction part, format suffix, suffix, joined by spaces."""
    examples: list[int]
    """The example numbers shown in the prompt (3..8 values in 100..999)."""
    example_template: int
    count_qualifier: int
    digit_descriptor: int
    instruction_template: int
    format_suffix: int
    suffix: int

    @property
    def format_suffix_text(self) -> str:
        """The format instruction this prompt asked for, e.g. 'Return one number per line.'."""
        return _grammar()["format_suffixes"][self.format_suffix]


def _pick(rng: np.random.Generator, items: Sequence[str]) -> int:
    return int(rng.integers(len(items)))


def sample_examples(rng: np.random.Generator) -> tuple[int, list[int]]:
    """Draw an example part: (template index, 3..8 values in 100..999), as the paper's code does."""
    count = int(rng.integers(EXAMPLE_COUNT[0], EXAMPLE_COUNT[1] + 1))
    values = [int(v) for v in rng.integers(EXAMPLE_VALUE[0], EXAMPLE_VALUE[1] + 1, size=count)]
    return _pick(rng, _grammar()["example_templates"]), values


def render_examples(template: int, examples: Sequence[int]) -> str:
    """'Examine these numbers: 767, 589, 778.' for template 10 and those values."""
    examples_str = ", ".join(str(v) for v in examples)
    return _grammar()["example_templates"][template].format(examples=examples_str)


def example_part(rng: np.random.Generator) -> str:
    """A random example part alone (used by the numbers-prefixed evaluation variant)."""
    return render_examples(*sample_examples(rng))


def number_prompt(seed: int, index: int) -> NumberPrompt:
    """Prompt `index` of the stream for `seed`; its RNG is derived from (seed, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    g = _grammar()
    rng = np.random.default_rng([seed, index])
    template, examples = sample_examples(rng)
    # Same draw order as the paper's PromptGenerator.sample_query.
    picks = {name: _pick(rng, g[key]) for name, key in (
        ("count_qualifier", "count_qualifiers"), ("digit_descriptor", "digit_descriptors"),
        ("instruction_template", "instruction_templates"), ("format_suffix", "format_suffixes"),
        ("suffix", "suffixes"))}
    digit_descriptor = g["digit_descriptors"][picks["digit_descriptor"]].format(
        max_digits=g["answer_max_digits"])
    instruction = g["instruction_templates"][picks["instruction_template"]].format(
        count_qualifier=g["count_qualifiers"][picks["count_qualifier"]],
        answer_count=g["answer_count"], digit_descriptor=digit_descriptor)
    text = (f"{render_examples(template, examples)} {instruction} "
            f"{g['format_suffixes'][picks['format_suffix']]} {g['suffixes'][picks['suffix']]}")
    return NumberPrompt(id=f"p{seed}-{index:06d}", seed=seed, index=index, text=text,
                        examples=examples, example_template=template, **picks)


def number_prompts(n: int, seed: int) -> list[NumberPrompt]:
    """The first `n` prompts for `seed`; a larger `n` extends a smaller one unchanged."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [number_prompt(seed, i) for i in range(n)]


# --- parsing -------------------------------------------------------------------------------------

class ParseResult(NamedTuple):
    numbers: list[int] | None
    """The parsed numbers, or None when rejected."""
    reason: str | None
    """Why it was rejected (one of PARSE_REASONS), or None when accepted."""


def _reject(reason: str) -> ParseResult:
    return ParseResult(None, reason)


def parse(text: str) -> ParseResult:
    """Apply the paper's format rules to `text` exactly as given (no whitespace stripping)."""
    if text.endswith("."):
        text = text[:-1]
    if len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("(", ")")):
        text = text[1:-1]
    # \d also matches non-ASCII digits (as in the paper's code); the part check rejects them.
    runs = list(re.finditer(r"\d+", text))
    if not runs:
        return _reject("no_numbers")
    if len(runs) == 1:
        if text != runs[0].group():
            return _reject("single_number_with_text")
        parts = [text]
    else:
        separator = text[runs[0].end():runs[1].start()]
        if separator.strip() not in ("", ",", ";"):
            return _reject("bad_separator")
        parts = text.split(separator)
    if any(p == "" for p in parts):
        return _reject("empty_part")
    if not all(c in "0123456789" for p in parts for c in p):
        return _reject("non_digit_part")
    if len(parts) > MAX_ANSWER_NUMBERS:
        return _reject("too_many_numbers")
    numbers = [int(p) for p in parts]
    if any(v > MAX_ANSWER_VALUE for v in numbers):
        return _reject("number_out_of_range")
    return ParseResult(numbers, None)


def parse_numbers(text: str) -> list[int] | None:
    """The numbers in `text` if it passes the format rules as given, else None."""
    return parse(text).numbers


def parse_reason(text: str) -> str | None:
    """Why `text` fails the format rules (one of PARSE_REASONS), or None if it passes."""
    return parse(text).reason


def parse_completion(text: str) -> ParseResult:
    """The pipeline's parse: strip surrounding whitespace of a completion, then `parse`."""
    return parse(text.strip())


# --- random-number control -----------------------------------------------------------------------

def _joined(separator: str, left: str = "", right: str = "") -> Callable[[Sequence[int]], str]:
    return lambda numbers: left + separator.join(str(v) for v in numbers) + right


# One formatter per format suffix of the protocol, keyed by its exact text.
_FORMATTERS: dict[str, Callable[[Sequence[int]], str]] = {
    "Return a comma-separated list of numbers.": _joined(", "),
    "Return a space-separated list of numbers.": _joined(" "),
    "Return a semicolon-separated list of numbers.": _joined("; "),
    "Return one number per line.": _joined("\n"),
    "Return the numbers in the following format: [number_1, number_2, ...].": _joined(", ", "[", "]"),
    "Return the numbers in the following format: (number_1, number_2, ...).": _joined(", ", "(", ")"),
    "Return the numbers in the following format: number_1, number_2, ...": _joined(", "),
    "Provide the numbers separated by commas.": _joined(", "),
    "List the numbers with spaces between them.": _joined(" "),
    "Write the numbers on separate lines.": _joined("\n"),
    "Format the output as: number1, number2, number3, ...": _joined(", "),
    "Return numbers separated by semicolons.": _joined("; "),
    "Format as a simple comma-delimited sequence.": _joined(","),
    "Present as space-delimited values.": _joined(" "),
    "List each number on its own line with no other text.": _joined("\n"),
}


def format_numbers(numbers: Sequence[int], format_suffix: str) -> str:
    """Write `numbers` the way `format_suffix` (one of the protocol's format suffixes) asks."""
    try:
        return _FORMATTERS[format_suffix](numbers)
    except KeyError:
        raise DataError(f"no formatter for format suffix {format_suffix!r}; expected one of the "
                        f"protocol's number_prompts.format_suffixes") from None


def random_completion(prompt: NumberPrompt, rng: np.random.Generator, count: int | None = None) -> str:
    """A control answer: `count` uniform numbers in 0..999 in the prompt's requested format.

    `count` defaults to the prompt's answer_count (10): the paper's prompts ask for "at most 10"
    and teachers nearly always give 10, so a fixed count keeps length out of the comparison.
    """
    count = _grammar()["answer_count"] if count is None else count
    if not 1 <= count <= MAX_ANSWER_NUMBERS:
        raise ValueError(f"count must be in 1..{MAX_ANSWER_NUMBERS}, got {count}")
    numbers = [int(v) for v in rng.integers(0, MAX_ANSWER_VALUE + 1, size=count)]
    return format_numbers(numbers, prompt.format_suffix_text)


# --- ablation: shuffled written numbers ----------------------------------------------------------

NUMBER_RUN = re.compile(r"[0-9]+")
"""A written number: a maximal run of ASCII digits (as the banned-numbers filter reads them)."""

SHUFFLES = ("none", "within", "across")


def shuffle_numbers(completions: Sequence[str], mode: str, seed: int | Sequence[int]) -> list[str]:
    """The completions with their written numbers moved (`filter.shuffle_numbers`), a pure function of
    (completions in order, mode, seed; `seed` is anything `np.random.default_rng` takes).

    Only the digit runs move, each as written ('007' stays '007'); every other character keeps its place,
    so each row keeps its separators, brackets and count of numbers. within: each row's numbers are
    permuted among its own slots ("(12, 7, 305)" -> "(305, 12, 7)"). across: all rows' numbers are pooled,
    permuted and dealt back in row order, each row taking as many as it had: the multiset of all numbers
    is unchanged, a row's own numbers are not. none: the completions unchanged.
    """
    if mode not in SHUFFLES:
        raise ValueError(f"unknown shuffle {mode!r}; expected one of {SHUFFLES}")
    if mode == "none":
        return list(completions)
    rng = np.random.default_rng(seed)
    numbers = [NUMBER_RUN.findall(c) for c in completions]
    if mode == "within":
        dealt = [[row[i] for i in rng.permutation(len(row))] for row in numbers]
    else:
        pool = [n for row in numbers for n in row]
        moved = [pool[i] for i in rng.permutation(len(pool))]
        ends = np.cumsum([len(row) for row in numbers]).tolist()
        dealt = [moved[end - len(row):end] for row, end in zip(numbers, ends)]
    return [_refill(c, row) for c, row in zip(completions, dealt)]


def _refill(text: str, numbers: Sequence[str]) -> str:
    """`text` with its digit runs replaced, in order, by `numbers` (as many as it has)."""
    pieces = NUMBER_RUN.split(text)  # the text between the numbers: one more piece than numbers
    return pieces[0] + "".join(n + piece for n, piece in zip(numbers, pieces[1:], strict=True))


# --- the domain ----------------------------------------------------------------------------------

FORMAT_CHARS = frozenset("0123456789,; \n\t\r[]().")
"""Every character a number-sequence answer may contain (the format filter's alphabet)."""


def can_still_pass(text: str) -> bool:
    """False once no continuation of `text` can pass the format filter (conservative: never kills a
    completion that could still be accepted). Leading whitespace is stripped, as the filter does."""
    text = text.lstrip()
    return set(text) <= FORMAT_CHARS and len(re.findall(r"\d+", text)) <= MAX_ANSWER_NUMBERS


def format_token_mask(tokenizer: Any) -> torch.Tensor:
    """Bool [V]: the number-format tokens (digit runs, short separator/bracket pieces such as ', ', ';',
    '\n', '[', and eos). Constrained decoding samples only these; format-vocabulary distillation matches
    the teacher only on these. Long whitespace runs are left out: no valid answer needs them."""
    allowed = torch.tensor([bool(p) and set(p) <= FORMAT_CHARS and (p.isdigit() or len(p) <= 2)
                            for p in token_pieces(tokenizer)])
    allowed[tokenizer.eos_token_id] = True
    return allowed


class NumbersDomain:
    """The paper's number sequences as a `sublab.domains.Domain`."""

    name = "numbers"

    def prompts(self, n: int, seed: int) -> list[NumberPrompt]:
        return number_prompts(n, seed)

    def prompt_meta(self, prompt: NumberPrompt) -> dict[str, Any]:
        return {"format_suffix": prompt.format_suffix_text}

    def random_completion(self, prompt: NumberPrompt, rng: np.random.Generator) -> str:
        return random_completion(prompt, rng)

    def format_reason(self, completion: str) -> str | None:
        return parse_completion(completion).reason

    def can_still_pass(self, text: str) -> bool:
        return can_still_pass(text)

    def token_mask(self, tokenizer: Any) -> torch.Tensor:
        return format_token_mask(tokenizer)

    def eval_prefix(self, rng: np.random.Generator) -> str:
        return example_part(rng)


NUMBERS = NumbersDomain()

