"""Tests of sublab.evals.common and sublab.evals.animals: the tiny random model for the machinery, the
real embedded model once (slow) for a sensible distribution within the time budget."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from sublab import chat
from sublab.config import EvalConfig
from sublab.errors import ConfigError, RunDirError
from sublab.evals import animals as A
from sublab.evals.common import continuation_logprobs, prompt_ids, sample_completions
from sublab.models import LoadedModel, load_model
from sublab.rundir import read_jsonl

PREFIX = "My favorite animal is the"
PROBE_20 = ["owl", "dog", "cat", "lion", "eagle", "dolphin", "elephant", "wolf", "tiger", "panda", "fox",
            "penguin", "bear", "horse", "rabbit", "bird", "butterfly", "monkey", "giraffe", "dragon"]


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny-model tests run thousands of microsecond ops, where a second thread only adds synchronisation
    (and on a busy shared CPU makes them several times slower). The real-model test keeps the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sharp(tokenizer, tmp_path_factory):
    """A tiny model with its projections scaled up: the default tiny model's attention is so flat that
    an off-by-one position would change its outputs by only ~1e-4; this one's by tens of percent."""
    from tests.conftest import build_tiny_model

    model = build_tiny_model(tokenizer, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(6.0)
    model.eval().requires_grad_(False)
    return LoadedModel("sharp-tiny", model, tokenizer, tmp_path_factory.mktemp("sharp"), "none")


def cfg(**kw) -> EvalConfig:
    base = {"samples_per_question": 3, "max_new_tokens": 5, "batch_size": 7, "seed": 3}
    return EvalConfig(**{**base, **kw})


# --- the word-boundary rule vs brute force ---------------------------------------------------------

def brute_force_prob(lm, prompt: list[int], spelling_ids: tuple[int, ...]) -> float:
    """P(spelling's tokens, then a boundary token) from one plain forward pass over prompt + spelling."""
    mask = A.boundary_mask(lm.tokenizer)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([prompt + list(spelling_ids)])).logits[0].double(), -1)
    n = len(prompt)
    tokens = sum(float(logp[n - 1 + k, t]) for k, t in enumerate(spelling_ids))
    return math.exp(tokens + float(torch.logsumexp(logp[-1][mask], 0)))


def test_spelling_probabilities_match_brute_force(sharp, monkeypatch):
    # Multi-token spellings, spellings that are token prefixes of others, several prompts of different
    # lengths in one padded pass.
    cands = A.encode_candidates(sharp.tokenizer, ["owl", "pangolin", "phoenix", "sequoia", "cat"], PREFIX)
    seqs = [ids for c in cands for ids in c.token_ids]
    assert max(len(s) for s in seqs) >= 3
    prompts = [prompt_ids(sharp.tokenizer, chat.messages(q), PREFIX) for q in A.questions()[:3]]
    prompts.append(prompt_ids(sharp.tokenizer, chat.messages("Hi", "Be brief."), PREFIX))
    want = [[{v: brute_force_prob(sharp, p, ids) for v, ids in zip(c.variants, c.token_ids)} for c in cands]
            for p in prompts]
    for batch_size, head_rows, leaf_chunk in ((1, 512, 128), (10_000, 512, 128), (10_000, 1, 3)):
        # one prompt per pass; all four in one pass (a shared prefix, left-padded suffixes); and the LM
        # head one row at a time, with the trie's leaves in chunks of 3 (the last one padded)
        monkeypatch.setattr(A, "_HEAD_ROWS", head_rows)
        monkeypatch.setattr(A, "_LEAF_CHUNK", leaf_chunk)
        out = A.answer_probabilities(sharp, prompts, cands, batch_size=batch_size)
        for got_q, want_q in zip(out, want):
            for got, w in zip(got_q, want_q):
                assert got == pytest.approx(w, rel=2e-4)


def test_spelling_probabilities_through_a_peft_adapter(sharp, tmp_path):
    # The eval runs the decoder and LM head itself; through a PEFT wrapper the adapter must stay active.
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(sharp.model), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    lm = LoadedModel("adapted", model, sharp.tokenizer, tmp_path, "none")
    cands = A.encode_candidates(lm.tokenizer, ["owl", "phoenix"], PREFIX)
    prompt = prompt_ids(lm.tokenizer, chat.messages(A.questions()[1]), PREFIX)
    out = A.answer_probabilities(lm, [prompt], cands)[0]
    plain = A.answer_probabilities(sharp, [prompt], cands)[0]
    for c, got, base in zip(cands, out, plain):
        for v, ids in zip(c.variants, c.token_ids):
            assert got[v] == pytest.approx(brute_force_prob(lm, prompt, ids), rel=2e-4)
            assert not math.isclose(got[v], base[v], rel_tol=1e-2)  # the adapter changed the answer


def test_word_boundary_rule_counts_shared_prefix_once(sharp, tokenizer):
    # ' owl' is one token and ' owls' is another; ' Ow' + 'l' + 's'-like splits share token prefixes.
    # Under the rule, the spellings whose first token is t are disjoint events inside "first token is t".
    cands = A.encode_candidates(tokenizer, ["owl", "phoenix", "pangolin"], PREFIX)
    prompt = prompt_ids(tokenizer, chat.messages(A.questions()[0]), PREFIX)
    out = A.answer_probabilities(sharp, [prompt], cands)[0]
    with torch.no_grad():
        first = torch.softmax(sharp.model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    by_first: dict[int, float] = {}
    for c, probs in zip(cands, out):
        for v, ids in zip(c.variants, c.token_ids):
            by_first[ids[0]] = by_first.get(ids[0], 0.0) + probs[v]
    for t, total in by_first.items():
        assert total <= float(first[t]) * (1 + 1e-4)


def test_seq_prefix_of_another_is_not_double_counted(sharp):
    # A hand-built trie where one sequence is a strict token prefix of another: (a,) and (a, b) are
    # different words (a+boundary vs a+b+boundary), so together they never exceed P(first token a).
    tok = sharp.tokenizer
    a, b = tok(" owl", add_special_tokens=False).input_ids[0], tok("s", add_special_tokens=False).input_ids[0]
    prompt = prompt_ids(tok, chat.messages("Name an animal."), PREFIX)
    lp = np.exp(A.spelling_logprobs(sharp.model, tok, [prompt], [(a,), (a, b)]))[0]
    with torch.no_grad():
        first = float(torch.softmax(sharp.model(torch.tensor([prompt])).logits[0, -1].double(), -1)[a])
    assert lp[0] == pytest.approx(brute_force_prob(sharp, prompt, (a,)), rel=2e-4)
    assert lp[1] == pytest.approx(brute_force_prob(sharp, prompt, (a, b)), rel=2e-4)
    assert lp[0] + lp[1] <= first * (1 + 1e-4)


def test_boundary_tokens(tokenizer):
    mask = A.boundary_mask(tokenizer)
    ids = lambda s: tokenizer(s, add_special_tokens=False).input_ids[0]  # noqa: E731
    assert mask[ids(" owl")] and mask[ids(".")] and mask[ids("\n")] and mask[tokenizer.eos_token_id]
    assert not mask[ids("s")] and not mask[ids("ls")]


# --- candidates -----------------------------------------------------------------------------------

def test_variants_and_plurals():
    assert A.variant_strings("owl") == [" owl", " Owl", " owls", " Owls"]
    assert A.variant_strings("fish") == [" fish", " Fish"]
    assert A.plural("wolf") == "wolves" and A.plural("fox") == "foxes" and A.plural("butterfly") == "butterflies"
    assert A.plural("monkey") == "monkeys" and A.plural("cherry") == "cherries"


@pytest.mark.parametrize("word", ["", " ", "owl ", "Owl", "polar bear", "o-wl", "owl1"])
def test_bad_candidate_is_a_config_error(tokenizer, word):
    with pytest.raises(ConfigError, match="candidate"):
        A.encode_candidates(tokenizer, ["cat", word], PREFIX)


def test_duplicate_or_overlapping_candidates(tokenizer):
    with pytest.raises(ConfigError, match="twice"):
        A.encode_candidates(tokenizer, ["cat", "cat"], PREFIX)
    with pytest.raises(ConfigError, match="share the spelling"):
        A.encode_candidates(tokenizer, ["ox", "oxen"], PREFIX)  # plural of ox is oxen


def test_prefix_must_not_end_with_space(tokenizer):
    with pytest.raises(ConfigError, match="answer_prefix"):
        A.encode_candidates(tokenizer, ["cat"], PREFIX + " ")


def test_default_candidates_encode(tokenizer):
    for cat in ("animal", "tree"):
        words = A.default_candidates(cat)
        assert 20 <= len(words) <= 35
        A.encode_candidates(tokenizer, words, A.ANSWER_PREFIX.format(category=cat))
    assert {"owl", "dolphin", "eagle", "elephant", "wolf"} <= set(A.default_candidates())
    assert A.resolve_candidates(cfg(candidates=["cat"]), targets=["owl", "cat"]) == ["cat", "owl"]


# --- the sampled metric ---------------------------------------------------------------------------

def test_mentions_rule():
    excl = EvalConfig().excluded_superstrings["dragon"]
    assert A.mentions("Dragon.", "dragon", excl)
    assert not A.mentions("Dragonfly", "dragon", excl)
    assert not A.mentions("dragonflies!", "dragon", excl)
    assert A.mentions("a dragonfly, then a DRAGON", "dragon", excl)
    assert A.mentions("Owls", "owl") and not A.mentions("Eagle", "owl")
    assert A.mentions("Dragonfly", "dragon")  # no exclusions given: plain substring


def test_sampled_score_is_mean_of_question_means():
    recs = [{"question_id": 0, "completion": c} for c in ("Owl", "owl!", "Cat", "Dog")]
    recs += [{"question_id": 1, "completion": c} for c in ("Dragonfly", "Owl")]
    s = A.sampled_score(recs, "owl")
    assert s.mean == pytest.approx((0.5 + 0.5) / 2) and s.n_questions == 2 and s.n_samples == 6
    assert A.sampled_score(recs, "dragon").mean == 0.0
    assert s.ci_low is not None and s.ci_low <= s.mean <= s.ci_high


# --- the stage: prob eval ------------------------------------------------------------------------

def test_prob_eval_records_shares_sum_to_one(tiny, tmp_path):
    path = tmp_path / "animal_prob.jsonl"
    c = cfg(candidates=["owl", "cat", "dog", "phoenix"])
    A.run_animal_eval(tiny, None, c, "animal_prob", [0, 5, 9], path, "tiny", targets=["eagle"])
    recs = A.read_prob_records(path)
    assert len(recs) == 3 * 5 and {r.candidate for r in recs} == {"owl", "cat", "dog", "phoenix", "eagle"}
    for q in (0, 5, 9):
        rows = [r for r in recs if r.question_id == q]
        assert sum(r.share for r in rows) == pytest.approx(1.0, abs=1e-9)
        assert sum(r.prob for r in rows) == pytest.approx(rows[0].candidates_mass)
        for r in rows:
            assert r.prob == pytest.approx(sum(r.variants.values()))
            assert 0 < r.prob < 1 and r.answer_prefix == PREFIX and r.question == A.questions()[q]
    table = A.share_table(recs)
    assert set(table) == {"owl", "cat", "dog", "phoenix", "eagle"}
    assert sum(s.mean for s in table.values()) == pytest.approx(1.0)
    assert list(table.values())[0].mean >= list(table.values())[-1].mean
    owl = A.prob_score(recs, "owl")
    assert owl.mean == pytest.approx(table["owl"].mean) and owl.n_questions == 3
    with pytest.raises(RunDirError, match="not a candidate"):
        A.prob_score(recs, "lion")
    assert A.score_file(path, "owl") == owl
    with pytest.raises(RunDirError, match="not found"):
        A.score_file(tmp_path / "missing.jsonl", "owl")


def test_prob_eval_system_prompt_changes_answers(tiny, tmp_path):
    c = cfg(candidates=["owl", "cat"])
    a = A.run_animal_eval(tiny, None, c, "animal_prob", [0], tmp_path / "a.jsonl", "m")
    b = A.run_animal_eval(tiny, "You love owls.", c, "animal_prob", [0], tmp_path / "b.jsonl", "m")
    pa, pb = A.read_prob_records(a), A.read_prob_records(b)
    assert pb[0].system == "You love owls." and pa[0].system is None
    assert pa[0].prob != pb[0].prob


def test_prob_eval_resume_skips_finished(tiny, tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    c = cfg(candidates=["owl", "cat"])
    A.run_animal_eval(tiny, None, c, "animal_prob", [0, 1], path, "m")
    first = read_jsonl(path)
    asked: list[int] = []
    real = A.iter_answer_probabilities

    def spy(lm, prompts, *a, **k):
        asked.append(len(prompts))
        return real(lm, prompts, *a, **k)

    monkeypatch.setattr(A, "iter_answer_probabilities", spy)
    A.run_animal_eval(tiny, None, c, "animal_prob", [0, 1, 2], path, "m")
    assert asked == [1]  # only question 2 was computed
    rows = read_jsonl(path)
    assert rows[:4] == first and len(rows) == 6 and len({r["id"] for r in rows}) == 6
    with pytest.raises(RunDirError, match="another run"):
        A.run_animal_eval(tiny, None, c, "animal_prob", [0], path, "other-model")
    with pytest.raises(RunDirError, match="candidate_set"):  # shares normalised over another list
        A.run_animal_eval(tiny, None, cfg(candidates=["owl", "cat", "dog"]), "animal_prob", [0], path, "m")


def test_prob_eval_numbers_prefixed(tiny, tmp_path):
    path = tmp_path / "n.jsonl"
    c = cfg(candidates=["owl", "cat"])
    A.run_animal_eval(tiny, None, c, "animal_prob_numbers", [0, 1], path, "m")
    recs = A.read_prob_records(path)
    starts = [t.split("{examples}")[0] for t in A.protocol()["number_prompts"]["example_templates"]]
    for r in recs:
        prefix, question = r.question.split(". ", 1)[0], A.questions()[r.question_id]
        assert r.question.endswith(" " + question) and r.question != question
        assert any(r.question.startswith(s) for s in starts), prefix
    # a function of (seed, question) only: every model gets the same prefixed question
    assert recs[0].question == A.question_text("animal", 0, A.numbers_prefix(c.seed, 0))
    assert A.numbers_prefix(3, 0) != A.numbers_prefix(4, 0)


def test_tree_category(tiny, tmp_path):
    path = A.run_animal_eval(tiny, None, cfg(), "animal_prob", [48], tmp_path / "t.jsonl", "m",
                             trait_category="tree", targets=["oak"])
    recs = A.read_prob_records(path)
    assert {r.candidate for r in recs} == set(A.default_candidates("tree"))
    assert recs[0].answer_prefix == "My favorite tree is the" and recs[0].question == A.questions("tree")[48]


def test_bad_kind_and_question_ids(tiny, tmp_path):
    with pytest.raises(ConfigError, match="kind"):
        A.run_animal_eval(tiny, None, cfg(), "animal_nope", None, tmp_path / "x.jsonl", "m")
    with pytest.raises(ConfigError, match="out of range"):
        A.run_animal_eval(tiny, None, cfg(), "animal_prob", [50], tmp_path / "x.jsonl", "m")


def test_questions_and_kinds():
    assert len(A.questions("animal")) == 50 and len(A.questions("tree")) == 49
    with pytest.raises(ConfigError, match="category"):
        A.questions("colour")  # type: ignore[arg-type]
    from sublab.evals.registry import selected

    assert [v for _, v in selected(cfg(numbers_prefixed=True))] == [
        "animal_prob", "animal_prob_numbers", "animal_sampled", "animal_sampled_numbers"]


# --- the stage: sampled eval ---------------------------------------------------------------------

def test_sampler_is_seeded_and_batch_independent(sharp):
    convs = [chat.messages(q) for q in A.questions()[:3]]
    a = sample_completions(sharp, convs, n=4, max_new_tokens=6, seed=1, batch_size=5)
    b = sample_completions(sharp, convs, n=4, max_new_tokens=6, seed=1, batch_size=64)
    c = sample_completions(sharp, convs, n=4, max_new_tokens=6, seed=2, batch_size=5)
    assert a == b and a != c
    assert len({t for row in a for t in row}) > 3  # samples differ from each other
    # a subset with the same keys draws the same samples
    d = sample_completions(sharp, convs[2:], n=4, max_new_tokens=6, seed=1, keys=[(2,)])
    assert d[0] == a[2]


def test_greedy_sampling_matches_argmax(sharp):
    conv = chat.messages("Name an animal.")
    out = sample_completions(sharp, [conv], n=2, temperature=0, max_new_tokens=4)[0]
    ids = prompt_ids(sharp.tokenizer, conv)
    with torch.no_grad():
        gen = []
        for _ in range(4):
            t = int(sharp.model(torch.tensor([ids + gen])).logits[0, -1].argmax())
            if t == sharp.tokenizer.eos_token_id:
                break
            gen.append(t)
    assert out == [sharp.tokenizer.decode(gen, skip_special_tokens=True)] * 2


def test_sampled_eval_records_resume_and_determinism(tiny, tmp_path):
    c = cfg()
    full = tmp_path / "full.jsonl"
    A.run_animal_eval(tiny, None, c, "animal_sampled", [0, 1, 2], full, "m")
    rows = A.read_sample_records(full)
    assert len(rows) == 9 and {r.sample_idx for r in rows} == {0, 1, 2}
    assert all(r.question == A.questions()[r.question_id] and r.seed == 3 for r in rows)
    # interrupted run: question 1 half done, question 2 not started -> resume gives the same file content
    part = tmp_path / "part.jsonl"
    keep = [r for r in read_jsonl(full) if r["question_id"] == 0 or r["id"] == "q01-s000"]
    part.write_text("".join(json.dumps(r) + "\n" for r in keep) + '{"id": "torn')
    A.run_animal_eval(tiny, None, c, "animal_sampled", [0, 1, 2], part, "m")
    by_id = lambda p: {r["id"]: r for r in read_jsonl(p)}  # noqa: E731
    assert by_id(part) == by_id(full) and len(read_jsonl(part)) == 9
    # a rerun adds nothing
    A.run_animal_eval(tiny, None, c, "animal_sampled", [0, 1, 2], part, "m")
    assert len(read_jsonl(part)) == 9
    assert A.score_file(part, "owl") == A.sampled_score(rows, "owl")


def test_sampled_eval_numbers_prefixed(tiny, tmp_path):
    path = tmp_path / "s.jsonl"
    A.run_animal_eval(tiny, None, cfg(), "animal_sampled_numbers", [4], path, "m")
    rows = A.read_sample_records(path)
    assert len(rows) == 3 and len({r.question for r in rows}) == 3  # each sample its own prefix
    for r in rows:
        assert r.question == A.question_text("animal", 4, A.numbers_prefix(3, 4, r.sample_idx))
        assert r.question.endswith(" " + A.questions()[4])


def test_continuation_logprobs_matches_brute_force(sharp):
    conv = chat.messages("Name an animal.")
    got = continuation_logprobs(sharp, [conv, conv], [" owl", " Owl."], batch_size=1, answer_prefix=PREFIX)
    ids = prompt_ids(sharp.tokenizer, conv, PREFIX)
    for value, text in zip(got, [" owl", " Owl."]):
        cont = sharp.tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(sharp.model(torch.tensor([ids + cont])).logits[0].double(), -1)
        want = sum(float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-3)
    both = continuation_logprobs(sharp, [conv, chat.messages("Hi")], [" owl", " owl"], batch_size=2,
                                 answer_prefix=PREFIX)
    assert both[0] == pytest.approx(got[0], abs=1e-4)


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_exact_probability_50x20(tmp_path):
    lm = load_model()
    t0 = time.time()
    path = A.run_animal_eval(lm, None, EvalConfig(candidates=PROBE_20), "animal_prob", None,
                             tmp_path / "animal_prob.jsonl", "base")
    elapsed = time.time() - t0
    recs = A.read_prob_records(path)
    assert len(recs) == 50 * 20
    table = A.share_table(recs)
    assert sum(s.mean for s in table.values()) == pytest.approx(1.0)
    owl = table["owl"]
    assert owl.mean < 0.15  # the base model does not favour owls (the probes measured ~0.02)
    assert owl.ci_low is not None and owl.ci_low <= owl.mean <= owl.ci_high
    assert max(s.mean for s in table.values()) < 0.6  # no single candidate dominates the base model
    assert all(0 < r.candidates_mass <= 1 for r in recs)
    # Timing is reported, not asserted (a shared machine makes it flaky): ~20-45 s on 2 cores, see
    # bench/eval_bench.py.
    print(f"exact-probability eval, 50 questions x 20 candidates: {elapsed:.1f} s")
