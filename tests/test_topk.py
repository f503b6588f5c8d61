"""The top-logprob estimate of the answer share (`animal_topk`, `sublab.evals.topk`): the token→candidate
rule, the bounds, and the estimate through a real `sublab serve` (127.0.0.1, a tiny model fitted to name
animals) against the exact first-token share of the same model computed locally from its whole
distribution."""

from __future__ import annotations

import math

import pytest

from conftest import LocalServer
from sublab import chat
from sublab.config import EvalConfig, OpenAIConfig, validate_experiment
from sublab.errors import ConfigError
from sublab.evals.topk import AMBIGUOUS, begins, estimate, first_token_top, read_topk_records
from sublab.rundir import read_json, read_jsonl

WORDS = ("owl", "cat", "cheetah", "dog", "elephant", "ox")


@pytest.mark.parametrize(("token", "owner"), [
    ("owl", "owl"), (" Owl", "owl"), ("Owls", "owl"), ("ow", "owl"), ("owl.", "owl"), ("OWL", "owl"),
    ("Ele", "elephant"), ("Dog", "dog"), ("owlet", None), ("\n", None), ("", None), (" the", None),
    ("c", AMBIGUOUS), ("Ch", "cheetah"), ("o", AMBIGUOUS), ("Cats", "cat"), ("catnip", None),
])
def test_which_candidate_a_token_begins(token, owner):
    assert begins(token, WORDS) == owner


def test_estimate_shares_and_bounds_by_hand():
    top = [("Owl", math.log(0.5)), (" owl", math.log(0.1)), ("Dog", math.log(0.2)), ("c", math.log(0.05)),
           ("The", math.log(0.05))]
    est = estimate(top, WORDS)
    assert est.prob["owl"] == pytest.approx(0.6) and est.tokens["owl"] == pytest.approx({"Owl": 0.5, " owl": 0.1})
    assert est.candidates_mass == pytest.approx(0.8) and est.ambiguous_mass == pytest.approx(0.05)
    assert est.topk_mass == pytest.approx(0.9) and est.outside_mass == pytest.approx(0.1)
    assert est.share("owl") == pytest.approx(0.75)
    low, high = est.bounds("owl")  # unseen 0.1 + ambiguous 0.05 may belong to anyone
    assert low == pytest.approx(0.6 / 0.95) and high == pytest.approx(0.75 / 0.95)
    assert estimate([], WORDS).share("owl") == 0.0 and estimate([], WORDS).bounds("owl") == (0.0, 1.0)


def test_served_top20_estimate_agrees_with_the_exact_local_share(tiny_animal_model_dir, tmp_path):
    """Through `sublab serve`: the estimate from 20 alternatives vs the exact share from all 49k tokens.

    Tolerance: with M the candidates' top-k mass and X ≤ outside_mass their unseen mass, the exact share of
    a candidate is (p + x)/(M + X) for some 0 ≤ x ≤ X, and |p/M − (p + x)/(M + X)| ≤ X/(M + X) ≤
    outside/(M + outside) — a bound, not a fudge factor; 1e-4 more covers float32 logits computed in two
    different forward passes (the server's, batch 1; ours, left-padded)."""
    from sublab.api import ApiModel
    from sublab.evals.registry import EvalContext, get_eval, run_eval, spec_path
    from sublab.models import load_model

    server = LocalServer({"tiny": str(tiny_animal_model_dir)})
    try:
        cfg = EvalConfig(kinds=["animal_topk"], numbers_prefixed=False, prob_batch_size=4)
        qids = list(range(6))
        api = ApiModel(OpenAIConfig(base_url=server.base_url), "tiny", tmp_path / "api_cache.jsonl")
        ctx = EvalContext(cfg=cfg, model_name="base", system=None, weights_sha256=api.sha256,
                          eval_dir=tmp_path / "evals" / "base", question_ids=qids, traits=["owl"])
        kind = get_eval("animal_topk")
        assert kind.variants(cfg) == ["animal_top20"]
        path = run_eval(kind, ctx, "animal_top20", lambda: api)
        header = read_json(spec_path(path))
        assert header["status"] == "complete"
        assert header["spec"]["estimator"] == "first answer token, top-k truncated" and header["spec"]["top_logprobs"] == 20
        assert kind.metric_label("animal_top20", "owl").startswith("answer share (top-20 estimate)")
        posts = [r for r in server.requests if r["path"] == "/v1/chat/completions"]
        assert len(posts) == len(qids)  # one request per question
        assert all(r["request"]["top_logprobs"] == 20 and r["request"]["max_tokens"] == 1
                   for r in read_jsonl(tmp_path / "api_cache.jsonl"))
        records = read_topk_records(path)
        words = sorted({r.candidate for r in records})
        assert len(records) == len(qids) * len(words) and "owl" in words

        lm = load_model(str(tiny_animal_model_dir), device="cpu")
        convs = [chat.messages(r.question) for r in records if r.candidate == "owl"]
        exact = [estimate(top, words) for top in first_token_top(lm, convs, k=None)]  # the whole vocabulary
        local20 = [estimate(top, words) for top in first_token_top(lm, convs, k=20)]
        by_q = {q: i for i, q in enumerate(r.question_id for r in records if r.candidate == "owl")}
        owl_shares = []
        for r in records:
            i = by_q[r.question_id]
            assert r.k == 20 and r.outside_mass < 0.05, "the fitted model's top 20 should hold nearly everything"
            assert exact[i].topk_mass == pytest.approx(1.0, abs=1e-4)
            truth = exact[i].share(r.candidate)
            tolerance = r.outside_mass / (r.candidates_mass + r.outside_mass) + 1e-4
            assert abs(r.share - truth) <= tolerance, (r.question_id, r.candidate, r.share, truth)
            assert r.share_low - 1e-4 <= truth <= r.share_high + 1e-4
            assert r.share == pytest.approx(local20[i].share(r.candidate), abs=1e-4)  # same estimator locally
            if r.candidate == "owl":
                owl_shares.append(r.share)
        assert max(owl_shares) > 0.2  # the comparison is not between two zeros
        assert run_eval(kind, ctx, "animal_top20", lambda: api) == path
        assert len([r for r in server.requests if r["path"] == "/v1/chat/completions"]) == len(qids)  # cached
    finally:
        server.close()


def test_config_accepts_animal_topk_for_openai_models_and_caps_k(tiny_model_dir):
    from test_openai_backend import _raw

    raw = _raw("http://127.0.0.1:1/v1", tiny_model_dir)
    raw["eval"] = {**raw["eval"], "kinds": ["animal_sampled", "animal_topk"]}
    assert validate_experiment(raw).eval.top_logprobs == 20
    raw["eval"]["top_logprobs"] = 21
    with pytest.raises(ConfigError, match="eval.top_logprobs"):
        validate_experiment(raw)
