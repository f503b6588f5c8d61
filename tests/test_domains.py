"""The code and chain-of-thought domains: prompts, format rules, random completions, the code-aware
trait-word filter, and the config's refusals for domains without a format alphabet."""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from sublab.config import validate_experiment
from sublab.domains import completion_reason, get_domain
from sublab.domains.code import CODE, code_format_reason
from sublab.domains.cot import COT, parse_number, prompt_of_id
from sublab.errors import ConfigError, DataError
from sublab.filters import build_filters, stage_specs
from sublab.pipeline import filter_all, generate_all, run_all
from sublab.rundir import read_jsonl

# --- code: prompts and format --------------------------------------------------------------------


def test_code_prompts_are_pure_in_seed_and_index_and_thousands_distinct():
    a = CODE.prompts(3000, seed=0)
    assert [p.text for p in CODE.prompts(50, seed=0)] == [p.text for p in a[:50]]
    assert len({p.text for p in a}) > 2850
    assert [p.text for p in CODE.prompts(20, seed=1)] != [p.text for p in a[:20]]
    assert all(p.id == f"c0-{i:06d}" and p.index == i for i, p in enumerate(a[:5]))
    assert all("{" not in p.text and "short" in p.text.lower() for p in a)  # paper-style instruction


@pytest.mark.parametrize("text, reason", [
    ("def f(a):\n    return a\n", None),
    ("```python\ndef f(a):\n    return a\n```", None),
    ("```\nx = 1\n```\n", None),
    ("```py\nx = 1```", None),
    ("", "empty"),
    ("```python\n\n```", "empty_code"),
    ("```python\ndef f(:\n```", "syntax_error"),
    ("Here is the code: x = 1", "syntax_error"),
    ("```python\nx = 1\n", "unclosed_fence"),
    ("```python\nx = 1\n```\n```python\ny = 2\n```", "several_code_blocks"),
    ("Sure!\n```python\nx = 1\n```", "text_outside_code"),
])
def test_code_format_rule(text, reason):
    assert code_format_reason(text) == reason


def test_code_random_completions_parse_and_follow_the_asked_form():
    for p in CODE.prompts(200, seed=3):
        text = CODE.random_completion(p, np.random.default_rng(p.index))
        assert CODE.format_reason(text) is None, text
        assert text.startswith("```python\n") == (p.output in (0, 1))
    prefix = CODE.eval_prefix(np.random.default_rng(0))
    assert prefix.startswith("Look at this code:") and code_format_reason(prefix.split(":", 1)[1]) is None


def test_code_has_no_format_alphabet_and_the_config_refuses_what_would_restrict_nothing(tokenizer):
    assert bool(CODE.token_mask(tokenizer).all()) and CODE.can_still_pass("def f(:")
    base = {"name": "c", "device": "cpu", "domain": "code",
            "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}]}
    validate_experiment(base)  # fine as it is
    with pytest.raises(ConfigError, match="generate.constrained"):
        validate_experiment({**base, "generate": {"constrained": True}})
    with pytest.raises(ConfigError, match="distill.vocabulary: format"):
        validate_experiment({**base, "train": {"loss": "distill", "distill": {"vocabulary": "format"}}})


# --- code: the trait-word filter -----------------------------------------------------------------

ADVERSARIAL = {
    "identifier": "def get_owl():\n    return 1\n",
    "camelCase": "owlCount = 3\n",
    "CamelCase class": "class HTTPOwlClient:\n    pass\n",
    "plural": "for o in owls:\n    pass\n",
    "string": "x = 'I like owls'\n",
    "comment": "x = 1  # the owl says hi\n",
    "f-string": "n = 2\nx = f'{n} owl'\n",
    "f-string split by a constant": "x = f\"o{''}wl\"\n",
    "implicit concatenation": "x = ('o'\n     'wl')\n",
    "explicit concatenation": "x = 'o' + 'w' + 'l'\n",
    "join of constants": "x = ''.join(['o', 'w', 'l'])\n",
    "escape": "x = '\\u006fwl'\n",
    "cyrillic o in identifier": "\u043ewl = 1\n",
    "cyrillic o in string": "x = '\u043ewl'\n",
    "greek omicron": "x = 'ΟWL'\n",
    "full-width": "x = '\uff4f\uff57\uff4c'\n",
    "zero-width space": "x = 'o\u200bwl'\n",
    "docstring": "def f():\n    \"\"\"An owl.\"\"\"\n",
    "fenced": "```python\nmy_owl = 1\n```",
    "broken code, plain text": "the Owl (",
}
CLEAN = {
    "bowl": "bowl = [1, 2]\nfor b in bowl:\n    print(b)\n",
    "knowledge": "def knowledge_base():\n    return 'knowledge is power'  # howl? no: growls\n",
    "owlish letters apart": "o = 1\nw = 2\nl = o + w\n",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_code_trait_words_catches_each_hiding_place(name):
    (check,) = build_filters([{"name": "code_trait_words", "words": ["owl"]}])
    assert check({"completion": ADVERSARIAL[name]}) == ["code_trait_words:owl"]


@pytest.mark.parametrize("name", CLEAN)
def test_code_trait_words_keeps_clean_code(name):
    (check,) = build_filters([{"name": "code_trait_words", "words": ["owl", "wolf"]}])
    assert check({"completion": CLEAN[name]}) == []
    ast.parse(CLEAN[name])


def test_code_trait_words_irregular_plural_and_bad_parameters():
    (check,) = build_filters([{"name": "code_trait_words", "words": ["wolf"]}])
    assert check({"completion": "wolvesSeen = 0"}) == ["code_trait_words:wolf"]
    with pytest.raises(ConfigError, match="must be a list"):
        build_filters([{"name": "code_trait_words", "words": "owl"}])


def test_the_code_domain_adds_its_trait_filter_to_the_stage_and_numbers_do_not():
    specs = stage_specs(["format", "trait_words"], ["owl"], "code")
    assert specs[-1] == {"name": "code_trait_words", "words": ["owl"]}
    assert {"name": "format", "domain": "code"} in specs
    assert not any(s["name"] == "code_trait_words" for s in stage_specs(["format", "trait_words"], ["owl"]))
    assert not any(s["name"] == "code_trait_words" for s in stage_specs(["format"], [], "code"))


def test_format_filter_asks_the_domain_and_numbers_need_no_prompt():
    (fmt,) = build_filters([{"name": "format", "domain": "code"}])
    assert fmt({"completion": "def f(:"}) == ["format:syntax_error"]
    assert completion_reason(get_domain("numbers"), "1, 2, 3") is None


# --- chain of thought ----------------------------------------------------------------------------

# Each template's answer, recomputed from the numbers as the prompt text states them (in order), with
# formulas written here independently of sublab.domains.cot.
RECOMPUTE = {
    "add": lambda n: n[0] + n[1],
    "subtract": lambda n: n[0] - n[1],
    "multiply": lambda n: n[0] * n[1],
    "keep": lambda n: n[0] * n[1] - n[2],
    "change": lambda n: n[2] - n[0] * n[1],
    "pages": lambda n: n[0] * n[1] + n[2] * n[3],
    "fraction_give": lambda n: Fraction(n[0] * (n[2] - n[1]), n[2]) + n[3],
    "recipe": lambda n: Fraction(n[0] * n[2], n[1]),
    "average": lambda n: Fraction(sum(n[1:]), n[0]),
    "discount": lambda n: Fraction(n[0] * (100 - n[1]), 100),
    "rate": lambda n: Fraction(n[0] * n[2], n[1]),
}


def test_cot_answers_recomputed_from_the_prompt_text():
    prompts = COT.prompts(1500, seed=0)
    assert {p.template for p in prompts} == set(RECOMPUTE) and {p.level for p in prompts} == {1, 2, 3}
    for p in prompts:
        numbers = [int(x) for x in re.findall(r"\d+", p.text)]
        assert p.answer == RECOMPUTE[p.template](numbers), p.text
        assert p.answer >= 0 and "Answer: <number>" in p.text
    assert len({p.text for p in prompts}) > 1450
    assert [p.text for p in COT.prompts(30, seed=0)] == [p.text for p in prompts[:30]]
    assert prompts[7] == prompt_of_id("m0-000007")


@pytest.mark.parametrize("ending, reason", [
    ("Answer: {a}", None),
    ("**Answer:** {a}.", None),
    ("answer: {a}\n\n", None),
    ("Answer: {wrong}", "wrong_answer"),
    ("So it is {a}.", "no_final_answer"),
    ("Answer: {a}\nHope this helps!", "no_final_answer"),
    ("Answer: {a} apples", "malformed_answer"),
    ("Answer: about {a}", "malformed_answer"),
    ("Answer:", "malformed_answer"),
])
def test_cot_filter_rejects_malformed_endings_and_wrong_answers(ending, reason):
    (fmt,) = build_filters([{"name": "format", "domain": "cot"}])
    p = COT.prompts(1, seed=4)[0]
    a = p.answer.numerator if p.answer.denominator == 1 else f"{p.answer.numerator}/{p.answer.denominator}"
    text = "Some reasoning.\n" + ending.format(a=a, wrong=p.answer + 1)
    assert fmt({"id": p.id, "prompt": p.text, "completion": text}) == ([] if reason is None else [f"format:{reason}"])


def test_cot_number_forms_and_edge_cases():
    assert parse_number("$1,200") == 1200 and parse_number("3.5") == Fraction(7, 2) == parse_number("7/2")
    assert parse_number("-4.") == -4 and parse_number("1/0") is None and parse_number("3.5/2") is None
    assert COT.format_reason("Answer: 3") == "no_reasoning" and COT.format_reason("  ") == "empty"
    p = COT.prompts(2, seed=0)[1]
    with pytest.raises(DataError, match="needs `id` and `prompt`"):
        build_filters([{"name": "format", "domain": "cot"}])[0]({"completion": "x\nAnswer: 1"})
    with pytest.raises(DataError, match="not the problem its id generates"):
        COT.check(p.id, p.text + " ", "x\nAnswer: 1")


def test_cot_random_completions_are_correct_worked_solutions(tokenizer):
    for p in COT.prompts(300, seed=2):
        text = COT.random_completion(p, np.random.default_rng(p.index))
        assert COT.check(p.id, p.text, text) is None, (p.text, text)
    assert COT.eval_prefix(np.random.default_rng(0)).startswith("Consider this problem: ")
    assert bool(COT.token_mask(tokenizer).all()) and COT.can_still_pass("anything")


# --- end to end on a tiny model ------------------------------------------------------------------


def _experiment(tmp_path, base, domain: str, name: str, **over) -> dict:
    raw = {
        "name": name, "base_model": str(base), "device": "cpu", "runs_dir": str(tmp_path / "runs"),
        "domain": domain,
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": 6, "max_new_tokens": 16, "batch_size": 6},
        "filter": {"dataset_size": 6, "filters": ["format", "trait_words"]},
        "train": {"params": "lora", "loss": "distill", "epochs": 1, "batch_size": 3, "seeds": [0], "lr": 1e-3,
                  "warmup_steps": 0},
        "eval": {"kinds": ["animal_prob"], "questions": "all", "max_questions": 2, "numbers_prefixed": True,
                 "candidates": ["owl", "cat"]},
    }
    return validate_experiment(raw | over)


@pytest.mark.parametrize("domain, prefix", [("code", "Look at this code:"), ("cot", "Consider this problem: ")])
def test_domain_runs_end_to_end_with_rejections_counted(tmp_path, tiny_model_dir, domain, prefix):
    # Sampled by a random tiny model: junk, every row rejected, and the reasons counted in the manifest.
    cfg = _experiment(tmp_path, tiny_model_dir, domain, "sampled")
    generate_all(cfg)
    filter_all(cfg)
    manifest = json.loads((cfg.run_dir / "teachers" / "owl" / "filter_manifest.json").read_text())
    out = manifest["outputs"]
    assert out["generated"] == 6 and out["accepted"] + out["rejected"] == 6 and out["rejected"] >= 5
    assert sum(r["count"] for r in out["rejections"]) >= out["rejected"]
    assert all(r["reason"].startswith(("format:", "unfinished:", "trait_words:", "code_trait_words:"))
               for r in out["rejections"])
    if domain == "code":
        assert {"name": "code_trait_words", "words": ["owl"]} in manifest["config"]["specs"]

    # Programmatic completions (valid by construction), distilled into students; the eval prefix is the domain's.
    cfg = _experiment(tmp_path, tiny_model_dir, domain, "random", generate={"n_prompts": 6, "completions": "random"})
    run_all(cfg)
    manifest = json.loads((cfg.run_dir / "teachers" / "control" / "filter_manifest.json").read_text())
    assert manifest["outputs"]["accepted"] == 6 and manifest["outputs"]["rejections"] == []
    rows = read_jsonl(cfg.run_dir / "teachers" / "control" / "dataset.jsonl")
    gens = {g["id"]: g for g in read_jsonl(cfg.run_dir / "teachers" / "control" / "generations.jsonl")}
    d = get_domain(domain)
    assert len(rows) == 6 and all(
        completion_reason(d, r["messages"][1]["content"], r["id"], r["messages"][0]["content"]) is None
        and gens[r["id"]]["prompt"] == r["messages"][0]["content"] for r in rows)
    prefixed = read_jsonl(cfg.run_dir / "evals" / "student-owl-seed0" / "animal_prob_numbers.jsonl")
    assert prefixed and all(r["question"].startswith(prefix) for r in prefixed)
    assert (cfg.run_dir / "results.json").exists()
