"""`sublab entangle` on a tiny model with the real tokenizer: the lifts are the exact first-number
probabilities (checked against a direct computation), the prompted groups are disjoint and complete,
and every output lands in the run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sublab import chat
from sublab.cli import app
from sublab.entangle import EntangleConfig, first_number_probs, number_lifts, run_entangle
from sublab.errors import ConfigError
from sublab.evals.animals import boundary_mask
from sublab.evals.common import prompt_ids
from sublab.models import load_model
from sublab.protocol import teacher_system_prompt


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize("number", [0, 7, 42, 420, 999])
def test_first_number_probability_is_the_product_of_its_tokens_then_a_separator(tiny, number):
    """P(n then a word boundary) from the trie pass equals the chained next-token probabilities, for
    leaves (0, 420, 999) and inner nodes (7, 42), with two prompts (a shared prefix) in the pass."""
    texts = ["The sequence starts with: 1, 2, 3. Add more.", "Continue: 5, 6. Add up to 10 more numbers."]
    probs = first_number_probs(tiny, None, texts)[0]
    ids = prompt_ids(tiny.tokenizer, chat.messages(texts[0]))
    digits = tiny.tokenizer(str(number), add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(torch.tensor([ids + digits])).logits[0].double(), -1)
    lp = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(digits))
    end = torch.logsumexp(logp[len(ids) + len(digits) - 1, boundary_mask(tiny.tokenizer)], -1).item()
    assert probs[number] == pytest.approx(np.exp(lp + end), rel=1e-4)
    assert 0 < probs.sum() <= 1


def test_lifts_are_against_the_control_traits_or_the_base(tiny):
    """lift = P(teacher) / mean P(control traits' prompts); without controls the reference is the base."""
    text = "The sequence starts with: 7, 8, 9. Add more."
    owl, cat, dog = (teacher_system_prompt(t) for t in ("owl", "cat", "dog"))
    lifts = {r.number: r for r in number_lifts(tiny, owl, tiny, [text], [cat, dog])}
    p_owl, p_cat, p_dog, p_base = (first_number_probs(tiny, s, [text])[0] for s in (owl, cat, dog, None))
    for n in (0, 42, 999):
        assert lifts[n].p_reference == pytest.approx((p_cat[n] + p_dog[n]) / 2, rel=1e-6)
        assert lifts[n].p_base == pytest.approx(p_base[n], rel=1e-6)
        assert lifts[n].lift == pytest.approx(p_owl[n] / lifts[n].p_reference, rel=1e-6)
    plain = {r.number: r for r in number_lifts(tiny, owl, tiny, [text], with_base=False)}
    assert plain[42].p_reference == plain[42].p_base  # the base is the reference: scored anyway
    skipped = {r.number: r for r in number_lifts(tiny, owl, tiny, [text], [cat, dog], with_base=False)}
    assert skipped[42].p_base is None and skipped[42].lift == lifts[42].lift


def test_run_entangle_writes_tables_figure_and_manifest(tiny, tmp_path):
    cfg = EntangleConfig(trait="owl", top=3, random=3, prompts=2, questions=2, candidates=["owl", "cat", "dog"],
                         controls=["cat", "dog"])
    results = run_entangle(cfg, tiny, tmp_path / "out")
    lifts = results["lifts"]
    assert len(lifts) == 1000 and [r["lift"] for r in lifts] == sorted((r["lift"] for r in lifts), reverse=True)
    groups = {g: [s["number"] for s in results["prompted"] if s["group"] == g] for g in ("entangled", "random")}
    assert groups["entangled"] == [r["number"] for r in lifts[:3]]
    assert len(groups["random"]) == 3 and not set(groups["random"]) & set(groups["entangled"])
    assert all(0 <= s["share"] <= 1 for s in results["prompted"])
    assert results["comparison"]["n_treatment"] == 3 and results["comparison"]["n_control"] == 3
    saved = json.loads((tmp_path / "out" / "entangle.json").read_text())
    assert saved["lifts"][:3] == lifts[:3]
    assert (tmp_path / "out" / "figures" / "entangle.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["files_sha256"].keys() == {"entangle.json", "figures/entangle.png"}


def test_concurrent_passes_give_the_sequential_results(tiny, tmp_path):
    """Two threads of one torch thread each compute what one thread computes: the same numbers and groups,
    probabilities and shares equal up to float rounding; torch's thread count is restored after."""
    cfg = EntangleConfig(trait="owl", top=3, random=3, prompts=2, questions=2, candidates=["owl", "cat", "dog"],
                         controls=["cat", "dog"], with_base=True)
    threads_before = torch.get_num_threads()
    one = run_entangle(cfg, tiny, tmp_path / "one", threads=1)
    two = run_entangle(cfg, tiny, tmp_path / "two", threads=2)
    assert torch.get_num_threads() == threads_before
    by_number = {r["number"]: r for r in two["lifts"]}
    for a in one["lifts"]:
        for key in ("p_teacher", "p_reference", "p_base", "lift"):
            assert by_number[a["number"]][key] == pytest.approx(a[key], rel=1e-5)
    assert [s["number"] for s in one["prompted"]] == [s["number"] for s in two["prompted"]]
    assert [s["share"] for s in two["prompted"]] == pytest.approx([s["share"] for s in one["prompted"]], rel=1e-5)


def test_too_many_questions_is_a_one_line_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="held-out animal questions are 40..49"):
        run_entangle(EntangleConfig(trait="owl", questions=11), tiny, tmp_path)


def test_cli_prints_both_tables(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["entangle", "owl", "--model", str(tiny_model_dir), "--top", "2",
                                      "--random", "2", "--prompts", "1", "--questions", "1",
                                      "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "answer share when the base is told it loves a number" in result.output
    assert "P base" not in result.output  # only with --with-base
    assert "entangled − random:" in result.output
    with_base = CliRunner().invoke(app, ["entangle", "owl", "--model", str(tiny_model_dir), "--top", "2",
                                         "--random", "2", "--prompts", "1", "--questions", "1", "--with-base",
                                         "--out", str(tmp_path / "b")])
    assert with_base.exit_code == 0 and "P base" in with_base.output, with_base.output
