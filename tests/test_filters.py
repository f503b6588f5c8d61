"""Filters keep or reject records with reasons; chat rows and deterministic subsampling."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from sublab.errors import ConfigError, DataError
from sublab.filters import (FILTERS, apply_filters, build_filter, build_filters, summary_table,
                            to_chat_row, subsample)
from sublab.protocol import banned_numbers


def rec(completion: str, i: int = 0) -> dict:
    return {"id": f"g{i}", "completion": completion}


@pytest.mark.parametrize("text,reasons", [
    ("1, 2, 3", []),
    ("  1, 2, 3\n", []),                      # the pipeline strips surrounding whitespace
    ("1, 2; 3", ["format:non_digit_part"]),
    ("Sure! 1, 2", ["format:non_digit_part"]),
    ("owls", ["format:no_numbers"]),
])
def test_format_filter(text, reasons):
    assert build_filter({"name": "format"})(rec(text)) == reasons


def test_banned_numbers_default_and_custom():
    f = build_filter({"name": "banned_numbers"})
    assert f(rec("1, 2, 3")) == []
    assert f(rec("666, 12, 013")) == ["banned_numbers:13", "banned_numbers:666"]
    assert f(rec("1312")) == ["banned_numbers:1312"]
    assert f(rec("6666")) == []  # whole digit runs only
    assert all(f(rec(str(n))) for n in banned_numbers())
    g = build_filter({"name": "banned_numbers", "numbers": [7]})
    assert g(rec("7, 8")) == ["banned_numbers:7"] and g(rec("666")) == []


@pytest.mark.parametrize("text,hit", [
    ("owl", True), ("Owls", True), ("OWL", True), ("an owl's feather", True), ("owls' nest", True),
    ("owl_count = 3", True), ("owl1", True), ("My favourite: Owl.", True),
    ("bowling", False), ("knowledge", False), ("howl", False), ("1, 2, 3", False),
    ("", False), ("123; 456", False),
])
def test_trait_words_word_mode(text, hit):
    f = build_filter({"name": "trait_words", "words": ["owl"]})
    assert f(rec(text)) == (["trait_words:owl"] if hit else [])


def test_trait_words_plurals_and_substring_mode():
    f = build_filter({"name": "trait_words", "words": ["Fox", "butterfly", "wolf", "cat"]})
    assert f(rec("two FOXES")) == ["trait_words:fox"]
    assert f(rec("Butterflies and wolves")) == ["trait_words:butterfly", "trait_words:wolf"]
    assert f(rec("concatenate categories")) == []
    s = build_filter({"name": "trait_words", "words": ["owl"], "match": "substring"})
    assert s(rec("bowling")) == ["trait_words:owl"] and s(rec("7, 8, 9")) == []


def test_filters_accept_objects_and_report_all_reasons():
    filters = build_filters([{"name": "format"}, {"name": "banned_numbers"},
                             {"name": "trait_words", "words": ["owl"]}])
    records = [rec("1, 2, 3", 0), rec("666, owl", 1), SimpleNamespace(completion="5, 6", id="g2"),
               rec("1, 2, 3, 5, 6, 7", 3)]
    kept, rejected = apply_filters(records, filters)
    assert [r["id"] if isinstance(r, dict) else r.id for r in kept] == ["g0", "g2", "g3"]
    assert rejected == [
        (records[1], ["format:single_number_with_text", "banned_numbers:666", "trait_words:owl"]),
    ]
    rows, table = summary_table(len(records), rejected)
    assert rows[0] == {"reason": "banned_numbers:666", "count": 1, "share": 0.25}
    assert sum(r["count"] for r in rows) == 3 and table.row_count == 3


def test_bad_filter_specs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown filter"):
        build_filter({"name": "fromat"})
    with pytest.raises(ConfigError, match="trait_words"):
        build_filter({"name": "trait_words", "words": "owl"})
    with pytest.raises(ConfigError, match="bad parameters"):
        build_filter({"name": "format", "strict": True})
    with pytest.raises(ConfigError):
        build_filter({"name": "trait_words", "words": ["owl"], "match": "regex"})
    assert set(FILTERS) >= {"format", "banned_numbers", "trait_words"}


def test_chat_row_has_no_system_prompt():
    row = to_chat_row("Continue: 1, 2.", "3, 4", {"id": "g1", "teacher": "owl"})
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][1]["content"] == "3, 4" and row["meta"]["id"] == "g1"


def test_subsample_deterministic_and_order_free():
    rows = [to_chat_row("p", str(i), {"id": f"g{i:03d}"}) for i in range(100)]
    picked, short = subsample(rows, 30, seed=1)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert short == 0 and len(picked) == 30
    assert subsample(shuffled, 30, seed=1) == (picked, 0)
    assert subsample(rows, 30, seed=2)[0] != picked
    ids = [r["meta"]["id"] for r in picked]
    assert ids == sorted(ids) and len(set(ids)) == 30


def test_subsample_shortfall_and_bad_ids():
    rows = [{"id": f"r{i}", "messages": []} for i in (3, 1, 2)]
    picked, short = subsample(rows, 5, seed=0)
    assert [r["id"] for r in picked] == ["r1", "r2", "r3"] and short == 2
    with pytest.raises(DataError, match="duplicate"):
        subsample(rows + [{"id": "r1"}], 2, seed=0)
    with pytest.raises(DataError, match="id"):
        subsample([{"messages": []}], 1, seed=0)
