"""The paper's number prompt grammar, parse rules and random-number control."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sublab.domains.numbers import (PARSE_REASONS, example_part, format_numbers, number_prompt,
                                 number_prompts, parse, parse_completion, parse_numbers,
                                 parse_reason, random_completion)
from sublab.errors import DataError
from sublab.protocol import protocol

G = protocol()["number_prompts"]

# (text as given, expected numbers or None, expected reason or None)
PARSE_CASES = [
    ("1, 2, 3", [1, 2, 3], None),
    ("1,2,3", [1, 2, 3], None),
    ("1 2 3", [1, 2, 3], None),
    ("1;2;3", [1, 2, 3], None),
    ("1; 2; 3", [1, 2, 3], None),
    ("1\n2\n3", [1, 2, 3], None),
    ("1 ,2 ,3", [1, 2, 3], None),
    ("1,2.", [1, 2], None),                      # one trailing '.' stripped
    ("1,2..", None, "non_digit_part"),          # only one
    ("[1, 2, 3]", [1, 2, 3], None),
    ("(1, 2, 3)", [1, 2, 3], None),
    ("[1, 2, 3].", [1, 2, 3], None),            # '.' first, then brackets
    ("[1, 2, 3", None, "non_digit_part"),
    ("[1, 2, 3)", None, "non_digit_part"),
    ("{1, 2, 3}", None, "non_digit_part"),
    ("087, 5", [87, 5], None),                   # leading zeros allowed
    ("5", [5], None),
    ("5.", [5], None),
    ("(5)", [5], None),
    ("0", [0], None),
    ("Answer 5", None, "single_number_with_text"),
    ("5 apples", None, "single_number_with_text"),
    ("", None, "no_numbers"),
    ("one, two", None, "no_numbers"),
    ("[]", None, "no_numbers"),
    ("1,2,", None, "empty_part"),               # trailing separator
    ("1,2,,3", None, "empty_part"),
    ("1,,2", None, "bad_separator"),            # separator is ',,'
    (",".join(map(str, range(10))), list(range(10)), None),
    (",".join(map(str, range(11))), None, "too_many_numbers"),
    ("1000", None, "number_out_of_range"),
    ("999, 1000", None, "number_out_of_range"),
    ("999, 0", [999, 0], None),
    ("1, 2; 3", None, "non_digit_part"),        # mixed separators
    ("1; 2, 3", None, "non_digit_part"),
    ("-5, 3", None, "non_digit_part"),
    ("1.5, 2", None, "bad_separator"),
    ("1 - 2 - 3", None, "bad_separator"),
    ("1 and 2", None, "bad_separator"),
    ("1, 2, and 3", None, "non_digit_part"),
    ("Here: 1, 2", None, "non_digit_part"),
    ("\u0661, \u0662", None, "non_digit_part"),  # Arabic-Indic digits
    ("\u0665", None, "non_digit_part"),
    ("1, \uff12", None, "non_digit_part"),      # fullwidth 2
    (" 1,2", None, "non_digit_part"),           # no pipeline strip here
    ("1,2 ", None, "non_digit_part"),
    ("1,2\n", None, "non_digit_part"),
    ("1, 2, 3 ", None, "non_digit_part"),
]


@pytest.mark.parametrize("text,numbers,reason", PARSE_CASES)
def test_parse_rules(text, numbers, reason):
    assert parse_numbers(text) == numbers
    assert parse_reason(text) == reason
    assert parse(text) == (numbers, reason)
    assert reason is None or reason in PARSE_REASONS


@pytest.mark.parametrize("text,numbers", [(" 1,2", [1, 2]), ("1,2\n", [1, 2]), ("\n[7, 8].\n", [7, 8]),
                                          ("  5  ", [5]), ("1 ,2 ", [1, 2])])
def test_pipeline_strips_surrounding_whitespace(text, numbers):
    assert parse_numbers(text) is None
    assert parse_completion(text).numbers == numbers


def test_prompts_deterministic_and_prefix_stable():
    a, b = number_prompts(50, seed=3), number_prompts(50, seed=3)
    assert a == b
    assert number_prompts(5, seed=3) == a[:5]
    assert number_prompt(3, 17) == a[17]
    assert [p.text for p in number_prompts(50, seed=4)] != [p.text for p in a]
    assert len({p.id for p in a}) == 50 and a[7].id == "p3-000007"


def _instruction_texts() -> set[str]:
    return {t.format(count_qualifier=q, answer_count=G["answer_count"],
                     digit_descriptor=d.format(max_digits=G["answer_max_digits"]))
            for t in G["instruction_templates"] for q in G["count_qualifiers"]
            for d in G["digit_descriptors"]}


def _strip_end(text: str, options: list[str]) -> tuple[str, str]:
    """Split `text` into (rest, part) where text == rest + ' ' + part and part is one of options."""
    hits = [o for o in options if text.endswith(" " + o)]
    assert len(hits) == 1, (text, hits)
    return text[: -len(hits[0]) - 1], hits[0]


def test_prompt_is_exactly_four_parts_from_protocol_lists():
    """Decompose each text independently: example part, instruction, format suffix, suffix."""
    instructions = _instruction_texts()
    assert len(instructions) == 10 * 9 * 8  # the descriptor list holds one duplicate
    example_res = [re.compile(re.escape(t).replace(re.escape("{examples}"), "(.*)"))
                   for t in G["example_templates"]]
    for p in number_prompts(300, seed=0):
        rest, suf = _strip_end(p.text, G["suffixes"])
        rest, fmt = _strip_end(rest, G["format_suffixes"])
        example, _ = _strip_end(rest, sorted(instructions))
        matches = [m for r in example_res if (m := r.fullmatch(example))]
        assert len(matches) == 1
        assert matches[0].group(1) == ", ".join(map(str, p.examples))
        assert (suf, fmt) == (G["suffixes"][p.suffix], G["format_suffixes"][p.format_suffix])
        assert p.format_suffix_text == fmt and "{" not in p.text


def test_prompt_draws_cover_ranges_uniformly_enough():
    prompts = number_prompts(3000, seed=1)
    counts = [len(p.examples) for p in prompts]
    values = [v for p in prompts for v in p.examples]
    assert set(counts) == set(range(3, 9))
    assert min(values) >= 100 and max(values) <= 999
    assert min(values) < 110 and max(values) > 990  # both ends reached
    for field, key in [("example_template", "example_templates"), ("suffix", "suffixes"),
                       ("format_suffix", "format_suffixes"), ("count_qualifier", "count_qualifiers"),
                       ("instruction_template", "instruction_templates"),
                       ("digit_descriptor", "digit_descriptors")]:
        seen = np.bincount([getattr(p, field) for p in prompts], minlength=len(G[key]))
        assert len(seen) == len(G[key]) and seen.min() > 0.4 * len(prompts) / len(G[key]), field


def test_example_part_shape():
    text = example_part(np.random.default_rng(0))
    match = next(t for t in G["example_templates"]
                 if re.fullmatch(re.escape(t).replace(re.escape("{examples}"), r"[0-9, ]+"), text))
    nums = re.findall(r"[0-9]+", text)
    assert match and 3 <= len(nums) <= 8 and all(100 <= int(n) <= 999 for n in nums)


@pytest.mark.parametrize("suffix", G["format_suffixes"])
def test_every_format_suffix_round_trips(suffix):
    rng = np.random.default_rng(0)
    for _ in range(20):
        numbers = [int(v) for v in rng.integers(0, 1000, size=int(rng.integers(1, 11)))]
        assert parse_numbers(format_numbers(numbers, suffix)) == numbers


def test_random_completion_matches_prompt_format():
    rng = np.random.default_rng(0)
    for p in number_prompts(100, seed=2):
        text = random_completion(p, rng)
        assert parse_numbers(text) is not None and len(parse_numbers(text)) == 10
        assert text == format_numbers(parse_numbers(text), p.format_suffix_text)
    assert len(parse_numbers(random_completion(p, rng, count=3))) == 3
    with pytest.raises(ValueError):
        random_completion(p, rng, count=11)


def test_unknown_format_suffix_is_a_data_error():
    with pytest.raises(DataError, match="format suffix"):
        format_numbers([1, 2], "Return the numbers as Roman numerals.")
