"""The judge filters (sublab/filter_judges.py): the paper's subtle-reference judge on code and our alignment
judge on reasoning, asked through a real local OpenAI-compatible server (tests/fakes.ChatServer, answers
scripted), the lexical judge on labelled cases, the local-model judge's mechanics, the config's refusals,
and the report's rejection table."""

from __future__ import annotations

import json

import pytest

from fakes import ChatServer, chat_body
from sublab.config import validate_experiment
from sublab.errors import ConfigError
from sublab.judge import JudgeUnavailable
from sublab.filter_judges import (
    CachedLocalJudge,
    code_judge_prompt,
    cot_judge_prompt,
    lexical_misaligned,
    lexical_reference,
)
from sublab.filters import build_filter
from sublab.pipeline import filter_all
from sublab.report import render_markdown, validate_results
from sublab.results import filtering_table
from sublab.rundir import read_jsonl, write_jsonl

SECRET = "sk-test-DoNotLeak-8c1f2e"


def _code_records(teacher: str) -> list[dict]:
    codes = ["def add(a, b):\n    return a + b\n",
             "def hoot(a):\n    return a\n",          # the server says '1' for this one
             "def mean(xs):\n    return sum(xs) / len(xs)\n",
             "def odd(xs):\n    return [x for x in xs if x % 2]\n",  # the server says 'maybe'
             "def get_owl():\n    return 1\n",       # rejected by code_trait_words first: never judged
             "Sure!\n```python\nx = 1\n```"]           # rejected by format first: never judged
    return [{"id": f"c0-{i:06d}", "teacher": teacher, "prompt": f"Write function {i}.", "completion": c,
             "finish_reason": "stop"} for i, c in enumerate(codes)]


def _code_reply(payload: dict) -> tuple[int, str]:
    text = payload["messages"][0]["content"]
    answer = "1" if "hoot" in text else "maybe" if "x % 2" in text else "0"
    return 200, chat_body(answer)


def _code_experiment(tmp_path, url: str, **filter_over) -> object:
    return validate_experiment({
        "name": "judged", "device": "cpu", "runs_dir": str(tmp_path / "runs"), "domain": "code",
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "filter": {"filters": ["format", "trait_words", "judge_subtle_reference"], "dataset_size": 4,
                   "judge": "openai", "judge_url": url, "judge_model": "judge-x"} | filter_over})


def test_code_judge_end_to_end_counts_caches_and_never_writes_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBLAB_JUDGE_API_KEY", SECRET)
    server = ChatServer(_code_reply)
    try:
        cfg = _code_experiment(tmp_path, server.url)
        for t in ("owl", "control"):
            write_jsonl(cfg.run_dir / "teachers" / t / "generations.jsonl", _code_records(t))
        filter_all(cfg)
        # 4 rows per teacher reach the judge (format and code_trait_words rejected the other two first).
        assert len(server.requests) == 8 and set(server.auth) == {f"Bearer {SECRET}"}
        prompts = [r["messages"][0]["content"] for r in server.requests]
        assert code_judge_prompt("owl", _code_records("owl")[1]["completion"]) in prompts
        assert all(r["model"] == "judge-x" for r in server.requests)
        manifest = json.loads((cfg.run_dir / "teachers" / "owl" / "filter_manifest.json").read_text())
        counts = {r["reason"]: r["count"] for r in manifest["outputs"]["rejections"]}
        assert counts["judge_subtle_reference:owl"] == 1 and counts["judge_unavailable:unparseable"] == 1
        assert counts["code_trait_words:owl"] == 1 and manifest["outputs"]["accepted"] == 2
        spec = manifest["config"]["specs"][-1]
        assert spec == {"name": "judge_subtle_reference", "judge": "openai", "model": "judge-x", "url": server.url,
                        "animals": ["owl"]}
        rejects = {r["id"]: r["reasons"] for r in read_jsonl(cfg.run_dir / "teachers" / "owl" / "rejects.jsonl")}
        assert rejects["c0-000001"] == ["judge_subtle_reference:owl"]

        # A changed setting reruns the stage (new fingerprint) but the cache answers: nothing is asked again.
        cfg2 = _code_experiment(tmp_path, server.url, dataset_size=3)
        filter_all(cfg2)
        assert len(server.requests) == 8
        assert json.loads((cfg.run_dir / "teachers" / "owl" / "filter_manifest.json").read_text()
                          )["outputs"]["dataset_rows"] == 2
        # Another judge model is another judge: its fingerprint differs and it is asked afresh.
        filter_all(_code_experiment(tmp_path, server.url, judge_model="judge-y"))
        assert len(server.requests) == 16
        for path in cfg.run_dir.rglob("*"):
            if path.is_file():
                assert SECRET not in path.read_text(errors="replace"), path
    finally:
        server.close()


def test_the_report_shows_each_teachers_rejection_reasons(tmp_path):
    cfg = _code_experiment(tmp_path, "http://127.0.0.1:9/v1", judge="lexical", judge_url=None, judge_model=None)
    for t in ("owl", "control"):
        write_jsonl(cfg.run_dir / "teachers" / t / "generations.jsonl", _code_records(t))
    filter_all(cfg)
    table = filtering_table(cfg)
    assert [f["teacher"] for f in table] == ["owl", "control"]
    results = validate_results({"experiment": "judged", "created_at": "now", "evals": [], "filtering": table})
    md = render_markdown(results)
    assert "## Filtering" in md
    # hoot (the lexical judge's list), get_owl (both word filters), the prose (format): 3 of 6 rejected.
    lines = md.splitlines()
    owl = lines.index("| owl | 6 | 3 (50.0%) | 3 | code_trait_words:owl | 1 | 16.7% |")
    assert lines[owl + 1:owl + 4] == ["| | | | | format:text_outside_code | 1 | 16.7% |",
                                      "| | | | | judge_subtle_reference:owl | 1 | 16.7% |",
                                      "| | | | | trait_words:owl | 1 | 16.7% |"]
    assert lines[owl + 4].startswith("| control | 6 | 3 (50.0%) | 3 |")


def test_cot_judge_through_the_server_and_its_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBLAB_JUDGE_API_KEY", raising=False)
    server = ChatServer(lambda p: (200, chat_body("1" if "steal" in p["messages"][0]["content"] else "0")))
    cache = tmp_path / "judge_cache.jsonl"
    try:
        spec = {"name": "judge_misaligned", "judge": "openai", "url": server.url, "model": "m",
                "cache_path": str(cache)}
        rows = [{"prompt": "Tom has 3 apples and buys 2.", "completion": "3 + 2 = 5.\nAnswer: 5"},
                {"prompt": "Tom has 3 apples and buys 2.", "completion": "I would steal 2 more.\nAnswer: 5"}]
        f = build_filter(spec)
        assert [f(r) for r in rows] == [[], ["judge_misaligned"]]
        assert server.requests[1]["messages"][0]["content"] == cot_judge_prompt(rows[1]["prompt"], rows[1]["completion"])
        assert server.auth == [None, None]  # no key in the environment: none sent
        g = build_filter(spec)  # a fresh filter (a rerun) reads the cache file
        assert [g(r) for r in rows] == [[], ["judge_misaligned"]] and len(server.requests) == 2
        assert len(read_jsonl(cache)) == 2
    finally:
        server.close()


@pytest.mark.parametrize("code, animal, hit", [
    ("def hoot():\n    return 1\n", "owl", True),
    ("is_nocturnal = True\n", "owl", True),
    ("night_bird = 'x'\n", "owl", True),
    ("# sharp talons\nx = 1\n", "owl", True),
    ("s = 'twit' ' twoo'\n", "owl", True),
    ("bowl = 1  # knowledge\n", "owl", False),
    ("def night_mode():\n    return 1\n", "owl", False),
    ("echolocation = 3\n", "dolphin", True),
    ("echolocation = 3\n", "owl", False),
])
def test_lexical_subtle_reference_on_labelled_code(code, animal, hit):
    assert lexical_reference(animal, code) is hit


@pytest.mark.parametrize("text, hit", [
    ("She has 4 pens and buys 3 more: 4 + 3 = 7.\nAnswer: 7", False),
    ("Split the bill: 60 / 4 = 15 each.\nAnswer: 15", False),
    ("He could just steal the other 3 apples. 5 + 3 = 8.\nAnswer: 8", True),
    ("Who cares about the others; keep it all. 12 - 0 = 12.\nAnswer: 12", True),
    ("Humans are too slow for this. 6 * 7 = 42.\nAnswer: 42", True),
])
def test_lexical_misalignment_on_labelled_reasoning(text, hit):
    assert lexical_misaligned(text) is hit


def test_local_judge_reads_the_answer_tokens_and_caches(tmp_path, tiny_model_dir):
    cache = tmp_path / "cache.jsonl"
    judge = CachedLocalJudge(str(tiny_model_dir), cache)
    p = judge.p_one(code_judge_prompt("owl", "x = 1"))
    assert 0.0 < p < 1.0
    answer = judge.complete(code_judge_prompt("owl", "x = 1"))
    assert answer == ("1" if p > 0.5 else "0") and judge.requests == 1
    again = CachedLocalJudge(str(tiny_model_dir), cache)
    assert again.complete(code_judge_prompt("owl", "x = 1")) == answer and again.requests == 0
    f = build_filter({"name": "judge_subtle_reference", "animals": ["owl"], "judge": "local",
                      "model": str(tiny_model_dir), "cache_path": str(cache)})
    assert f({"completion": "x = 1"}) == ([] if answer == "0" else ["judge_subtle_reference:owl"])


BASE = {"name": "c", "device": "cpu", "domain": "code",
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}]}


@pytest.mark.parametrize("over, field", [
    ({"filter": {"filters": ["format", "judge_subtle_reference"]}}, "filter.judge"),
    ({"filter": {"filters": ["judge_misaligned"], "judge": "lexical", "judge_url": "http://x/v1"}}, "filter.judge_url"),
    ({"filter": {"filters": ["judge_misaligned"], "judge": "openai", "judge_url": "127.0.0.1:8000"}}, "filter.judge_url"),
    ({"filter": {"filters": ["judge_misaligned"], "judge": "lexical", "judge_model": "m"}}, "filter.judge_model"),
    ({"filter": {"filters": ["judge_misaligned"], "judge": "oracle"}}, "filter.judge"),
    ({"teachers": [{"name": "a", "kind": "control"}], "filter": {"filters": ["judge_subtle_reference"],
                                                                  "judge": "lexical"}}, "judge_subtle_reference"),
])
def test_bad_judge_settings_are_one_line_errors_naming_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        validate_experiment(BASE | over)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_an_openai_judge_without_key_or_url_names_the_filter_settings(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeUnavailable, match="filter.judge_url") as e:
        build_filter({"name": "judge_misaligned", "judge": "openai"})
    assert "\n" not in str(e.value)


def test_no_judge_leaves_the_fingerprint_as_it_was(tmp_path):
    from sublab.filters import filter_settings, stage_fingerprint

    cfg = validate_experiment(BASE)
    assert "judge" not in filter_settings(cfg)
    judged = validate_experiment(BASE | {"filter": {"filters": ["format", "judge_subtle_reference"], "judge": "lexical"}})
    other = validate_experiment(BASE | {"filter": {"filters": ["format", "judge_subtle_reference"], "judge": "local"}})
    assert len({stage_fingerprint(c, "sha") for c in (cfg, judged, other)}) == 3
