"""The shuffled-written-numbers ablation (`filter.shuffle_numbers`): the pure shuffle, its config check,
its fingerprint, and the filter stage on hand-made generations."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from sublab import filters
from sublab.config import validate_experiment
from sublab.domains.numbers import shuffle_numbers
from sublab.errors import ConfigError
from sublab.rundir import read_jsonl, write_jsonl

ROWS = ["(12, 7, 305)", "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", "44; 55; 66.", "900\n901\n902\n903",
        "007 8 9", "5", "10,20,30,40", "  (3, 33, 333)"]

BASE = {"name": "shuffle", "device": "cpu",
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}]}


def numbers(text: str) -> list[str]:
    return re.findall(r"[0-9]+", text)


def skeleton(text: str) -> str:
    return re.sub(r"[0-9]+", "#", text)


def test_within_keeps_each_rows_numbers_and_skeleton_and_permutes():
    out = shuffle_numbers(ROWS, "within", seed=0)
    assert len(out) == len(ROWS)
    for old, new in zip(ROWS, out):
        assert skeleton(new) == skeleton(old)
        assert Counter(numbers(new)) == Counter(numbers(old))
    assert sum(new != old for old, new in zip(ROWS, out)) >= 5  # 7 rows can change; identity is unlikely
    assert shuffle_numbers(["5"], "within", seed=0) == ["5"]


def test_within_example_from_the_paper_ablation():
    seen = {shuffle_numbers(["(12, 7, 305)"], "within", seed=s)[0] for s in range(40)}
    assert seen == {"(12, 7, 305)", "(12, 305, 7)", "(7, 12, 305)", "(7, 305, 12)", "(305, 12, 7)",
                    "(305, 7, 12)"}


def test_across_keeps_the_pool_and_each_rows_skeleton_and_moves_numbers_between_rows():
    out = shuffle_numbers(ROWS, "across", seed=0)
    assert [skeleton(t) for t in out] == [skeleton(t) for t in ROWS]
    assert [len(numbers(t)) for t in out] == [len(numbers(t)) for t in ROWS]
    assert Counter(n for t in out for n in numbers(t)) == Counter(n for t in ROWS for n in numbers(t))
    # Numbers left their rows: some row's multiset differs from its own before.
    assert sum(Counter(numbers(new)) != Counter(numbers(old)) for old, new in zip(ROWS, out)) >= 5


@pytest.mark.parametrize("mode", ["within", "across"])
def test_shuffle_is_deterministic_in_the_seed(mode):
    assert shuffle_numbers(ROWS, mode, seed=3) == shuffle_numbers(list(ROWS), mode, seed=3)
    assert shuffle_numbers(ROWS, mode, seed=[3, 1]) == shuffle_numbers(ROWS, mode, seed=[3, 1])
    assert shuffle_numbers(ROWS, mode, seed=3) != shuffle_numbers(ROWS, mode, seed=4)


def test_none_and_unknown_modes():
    assert shuffle_numbers(ROWS, "none", seed=0) == ROWS
    with pytest.raises(ValueError, match="all"):
        shuffle_numbers(ROWS, "all", seed=0)


def test_fingerprint_unchanged_for_none_and_changed_when_set():
    plain = validate_experiment(BASE)
    none = validate_experiment(BASE | {"filter": {"shuffle_numbers": "none"}})
    within = validate_experiment(BASE | {"filter": {"shuffle_numbers": "within"}})
    across = validate_experiment(BASE | {"filter": {"shuffle_numbers": "across"}})
    assert "shuffle_numbers" not in filters.filter_settings(none)
    assert filters.stage_fingerprint(none, "sha") == filters.stage_fingerprint(plain, "sha")
    # The value before the field existed: the same settings dump, without it.
    settings = plain.filter.model_dump(mode="json", exclude={"shuffle_numbers", "judge", "judge_url", "judge_model"})
    old = filters.fingerprint({"filter": settings, "specs": filters._specs(plain), "generations": "sha"})
    assert filters.stage_fingerprint(plain, "sha") == old
    assert len({filters.stage_fingerprint(c, "sha") for c in (plain, within, across)}) == 3
    assert filters.filter_settings(within)["shuffle_numbers"] == "within"


@pytest.mark.parametrize("domain", ["code", "cot"])
def test_other_domains_are_a_one_line_config_error(domain):
    with pytest.raises(ConfigError) as e:
        validate_experiment(BASE | {"domain": domain, "filter": {"shuffle_numbers": "within"}})
    message = str(e.value)
    assert "filter.shuffle_numbers" in message and "domain: numbers" in message and "\n" not in message
    validate_experiment(BASE | {"domain": domain})  # none is fine anywhere


def _generations(teacher: str) -> list[dict]:
    completions = ROWS + ["Sure: 1, 2", "(1, 2, 3)"]  # the prose fails the format filter
    return [{"id": f"p0-{i:06d}", "teacher": teacher, "prompt": f"Continue {i}.", "completion": c,
             "finish_reason": "stop"} for i, c in enumerate(completions)]


def _filtered(tmp_path, name: str, mode: str) -> tuple[list[dict], dict, bytes]:
    cfg = validate_experiment(BASE | {"name": name, "runs_dir": str(tmp_path / "runs"),
                                      "filter": {"dataset_size": 6, "shuffle_numbers": mode, "subsample_seed": 2}})
    teacher = cfg.teachers[0]
    directory = cfg.run_dir / "teachers" / teacher.name
    write_jsonl(directory / "generations.jsonl", _generations(teacher.name))
    filters.run(cfg, cfg.run_dir, teacher)
    manifest = json.loads((directory / filters.MANIFEST).read_text())
    return read_jsonl(directory / "dataset.jsonl"), manifest, (directory / "dataset.jsonl").read_bytes()


def test_the_filter_stage_shuffles_the_subsampled_rows_and_records_it(tmp_path):
    plain, plain_manifest, _ = _filtered(tmp_path, "plain", "none")
    across, manifest, data = _filtered(tmp_path, "across", "across")
    assert "shuffled_rows" not in plain_manifest["outputs"]
    assert "shuffle_numbers" not in plain_manifest["config"]["filter"]
    # The same rows (ids, prompts), only the assistant's numbers moved, among these rows only.
    assert [r["id"] for r in across] == [r["id"] for r in plain]
    assert [r["messages"][0] for r in across] == [r["messages"][0] for r in plain]
    texts = [r["messages"][1]["content"] for r in plain]
    moved = [r["messages"][1]["content"] for r in across]
    assert [skeleton(t) for t in moved] == [skeleton(t) for t in texts]
    assert Counter(n for t in moved for n in numbers(t)) == Counter(n for t in texts for n in numbers(t))
    changed = sum(a != b for a, b in zip(texts, moved))
    assert changed > 0 and manifest["outputs"]["shuffled_rows"] == changed
    assert manifest["config"]["filter"]["shuffle_numbers"] == "across"
    assert manifest["outputs"]["accepted"] == plain_manifest["outputs"]["accepted"]
    # Same config, same bytes.
    assert _filtered(tmp_path, "across-again", "across")[2] == data
