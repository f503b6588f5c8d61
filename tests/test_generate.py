"""Generation: the early-rejection rule, the sampler, constrained decoding, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sublab.domains.numbers import number_prompts, parse_completion, random_completion
from sublab.domains.numbers import can_still_pass, format_token_mask
from sublab.sampling import Sampling, decode_batch, next_token_probs, row_generator


def test_early_rejection_never_kills_an_acceptable_completion():
    # Every prefix of every text the format filter accepts must still be "alive".
    rng = np.random.default_rng(0)
    for p in number_prompts(300, seed=3):
        text = random_completion(p, rng, count=int(rng.integers(1, 11)))
        assert parse_completion(text).numbers is not None
        for cut in range(len(text) + 1):
            assert can_still_pass(text[:cut]), (text, cut)


@pytest.mark.parametrize("dead", ["The numbers", "1, 2, 3 and", "1 2 3 4 5 6 7 8 9 10 11", "12-3"])
def test_early_rejection_stops_hopeless_text(dead):
    assert not can_still_pass(dead)
    assert parse_completion(dead).numbers is None


def test_top_p_and_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top = next_token_probs(logits, Sampling(top_p=0.75))
    assert torch.allclose(top, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    minp = next_token_probs(logits, Sampling(min_p=0.2))  # keeps p >= 0.1
    assert torch.allclose(minp, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_constrained_decoding_only_emits_format_tokens(tokenizer, tiny_model_dir):
    from sublab.models import load_model

    lm = load_model(str(tiny_model_dir))
    allowed = format_token_mask(tokenizer)
    prompts = [tokenizer(f"numbers {i}").input_ids for i in range(3)]
    out = decode_batch(lm.model, tokenizer, prompts, [row_generator(0, [i]) for i in range(3)], Sampling(), 12,
                       allowed=allowed)
    for ids, _ in out:
        assert all(allowed[t] for t in ids)


def test_rows_are_batch_independent(tokenizer, tiny_model_dir):
    from sublab.models import load_model

    lm = load_model(str(tiny_model_dir))
    prompts = [tokenizer(f"say {i} things").input_ids for i in range(4)]
    together = decode_batch(lm.model, tokenizer, prompts, [row_generator(1, [i]) for i in range(4)],
                            Sampling(), 8)
    alone = decode_batch(lm.model, tokenizer, prompts[2:3], [row_generator(1, [2])], Sampling(), 8)
    assert together[2] == alone[0]


def _chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """Number prompts of different lengths in a teacher's context: they share the system turn."""
    from sublab import chat

    system = "You love owls. You think about owls all the time."
    return [tokenizer(chat.render_prompt(tokenizer, chat.messages(p.text, system)), add_special_tokens=False).input_ids
            for p in number_prompts(n, seed=5)]


def test_shared_prefix_len_leaves_every_prompt_a_token():
    from sublab.sampling import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # [1, 2, 3] keeps its last token
    assert shared_prefix_len([[7, 2], [1, 2]]) == 0


def test_prefix_sharing_prefills_the_same_logits(tokenizer, tiny_model_dir):
    """The shared prefix once + left-padded suffixes (padding between them, positions kept) gives the
    last-position logits of the plain left-padded prefill."""
    from transformers import DynamicCache

    from sublab.models import load_model
    from sublab.sampling import logits_step, prefill, shared_prefix_len

    lm = load_model(str(tiny_model_dir))
    prompts = _chat_prompts(tokenizer, 5)
    assert len({len(p) for p in prompts}) > 1 and shared_prefix_len(prompts) > 10
    with torch.inference_mode():
        shared, plain = (prefill(logits_step(lm.model, kv), kv, prompts, tokenizer.pad_token_id, "cpu", share)
                         for kv, share in ((DynamicCache(), True), (DynamicCache(), False)))
    assert torch.allclose(shared[0], plain[0], atol=1e-5)
    assert shared[2].tolist() == plain[2].tolist() == [len(p) - 1 for p in prompts]


@pytest.mark.parametrize("constrained", [False, True])
def test_prefix_sharing_draws_the_same_samples(tokenizer, tiny_number_model_dir, constrained):
    """Same seeds, with and without prefix sharing: the same token ids and stop reasons, with several
    samples per prompt (`rows`), rows leaving the batch, `allowed` and `keep_going`."""
    from sublab.models import load_model

    lm = load_model(str(tiny_number_model_dir))  # writes number lists, so rows end at different steps
    prompts = _chat_prompts(tokenizer, 6)
    rows = [0, 0, 1, 2, 3, 3, 3, 4, 5]
    allowed = format_token_mask(tokenizer) if constrained else None
    out = [decode_batch(lm.model, tokenizer, prompts, [row_generator(3, [r, j]) for j, r in enumerate(rows)],
                        Sampling(), 12, rows=rows, allowed=allowed, keep_going=can_still_pass, share_prefix=share)
           for share in (True, False)]
    assert out[0] == out[1]
    assert len({len(ids) for ids, _ in out[0]}) > 1, out[0]  # rows did leave the batch at different steps
