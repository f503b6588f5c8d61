"""Batched sampling from a local transformers model: the one decode loop of generation and evaluation.

Reads nothing, writes nothing: `sublab.generate` (teacher data) and `sublab.evals` (sampled metrics)
call `decode_batch`. What may be sampled (constrained decoding) and when to stop early are the data
domain's (`sublab.domains`): they arrive as `allowed` and `keep_going`.

What makes it faster than `model.generate` on a CPU, none of which changes what is sampled:
  * finished rows leave the batch (their KV-cache rows are dropped), instead of decoding padding until
    the longest row ends;
  * several samples of one prompt share its prefill (`rows`);
  * the prefix all prompts of a batch share (chat template, system prompt) is prefilled once (`prefill`);
  * a caller's `keep_going(text)` can stop a row early (generation stops completions that can no
    longer pass the format filter).
Each row draws from its own torch.Generator, so a sample does not depend on its batch: a resumed or
re-batched run draws the same samples (up to float rounding across batch shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature, min-p and top-p, or greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    greedy: bool = False


def row_generator(seed: int, key: Sequence[int]) -> torch.Generator:
    """A CPU generator seeded by (seed, *key) only: independent of batching, resumption and device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0] >> 1))
    return g


@cache
def token_pieces(tokenizer: Any) -> tuple[str, ...]:
    """The decoded text of every token id (cached per tokenizer; ~1 s for a 49k vocabulary)."""
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids), each [B, T], left-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def next_token_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, min-p and top-p applied to last-position logits [B, V] → probabilities [B, V]."""
    probs = torch.softmax(logits.float() / max(s.temperature, 1e-6), dim=-1)
    if s.min_p > 0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if s.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def draw(logits: torch.Tensor, generators: Sequence[torch.Generator], s: Sampling) -> list[int]:
    """One token per row: the argmax when greedy, else a draw from each row's own generator."""
    if s.greedy or s.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = next_token_probs(logits, s).cpu()
    return [int(torch.multinomial(probs[i], 1, generator=g)[0]) for i, g in enumerate(generators)]


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every prompt starts with, leaving each prompt at least one
    token of its own (the last prompt token's logits start the decode)."""
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""One forward pass that appends to a KV cache: (input ids, attention mask, position ids) → the last
column's output ([B, V] logits for decoding, [B, H] hidden states for scoring)."""


def logits_step(model: Any, kv: Any) -> Step:
    """`model`'s last-column logits, appending to the cache `kv`."""
    def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv, use_cache=True,
                     logits_to_keep=last_position(ids.shape[1], ids.device)).logits[:, -1]
    return step


def prefill(step: Step, kv: Any, prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str,
            share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `prompts` into the cache `kv` with `step`; returns (its output for each prompt's last token,
    the attention mask [B, T] over the cache, the last prompt token's position [B]).

    With `share_prefix`, the prefix all prompts share (the chat template's system turn, a teacher's
    system prompt: a third of a number prompt) runs once, for one row, and is copied to every row; then
    only the suffixes run, left-padded. The padding then sits between prefix and suffix, so it is masked
    and every real token keeps the position it has without sharing: the same computation up to float
    rounding."""
    shared = shared_prefix_len(prompts) if share_prefix and len(prompts) > 1 else 0
    if shared:
        prefix = torch.tensor([list(prompts[0][:shared])], device=device)
        step(prefix, torch.ones_like(prefix), torch.arange(shared, device=device)[None])
        kv.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=device))  # 1 row → B rows
    ids, mask, positions = left_pad([p[shared:] for p in prompts], pad, device)
    mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=1)  # [ones(prefix) | suffix mask]
    positions = positions + shared
    return step(ids, mask, positions), mask, positions[:, -1]


def last_position(width: int, device: torch.device | str) -> torch.Tensor:
    """`logits_to_keep` for the last column only, as an index: transformers then gathers a contiguous
    [B, 1, H] and the LM head is one matmul. `logits_to_keep=1` slices a strided view, which the head
    runs as a batched matmul against a copy of the weight per row (~1 s for 64 rows on one CPU thread)."""
    return torch.tensor([width - 1], device=device)


@torch.inference_mode()
def decode_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                 generators: Sequence[torch.Generator], sampling: Sampling, max_new_tokens: int, *,
                 rows: Sequence[int] | None = None, allowed: torch.Tensor | None = None,
                 keep_going: Callable[[str], bool] | None = None, share_prefix: bool = True
                 ) -> list[tuple[list[int], str]]:
    """Decode one batch. Row r continues prompts[rows[r]] (default: one row per prompt) with
    generators[r]. Returns, per row, its new token ids (the end token excluded) and why it stopped:
    'eos', 'length' (max_new_tokens), or 'early_stop' (`keep_going` returned False on its text).
    `allowed` ([V] bool) masks the vocabulary (constrained decoding). `share_prefix`: prefill the
    prompts' common prefix once (`prefill`); it changes nothing but float rounding."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    rows = list(range(len(prompts))) if rows is None else list(rows)
    kv = DynamicCache()
    step = logits_step(model, kv)
    logits, mask, last = prefill(step, kv, prompts, tokenizer.pad_token_id, device, share_prefix)
    index = torch.tensor(rows, device=device)
    if len(rows) != len(prompts) or rows != list(range(len(prompts))):
        kv.batch_select_indices(index)  # [n_prompts] → [n_rows]: samples share their prompt's prefill
    logits, mask, last = logits[index], mask[index], last[index]
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    pieces = token_pieces(tokenizer) if keep_going else ()
    live = list(range(len(rows)))  # batch position → row
    out: list[list[int]] = [[] for _ in rows]
    texts = [""] * len(rows)
    reasons = ["length"] * len(rows)
    for _ in range(max_new_tokens):
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(device), float("-inf"))
        tokens = draw(logits, [generators[r] for r in live], sampling)
        keep = []
        for j, (r, t) in enumerate(zip(live, tokens)):
            if t in stop:
                reasons[r] = "eos"
                continue
            out[r].append(t)
            if keep_going is not None:
                texts[r] += pieces[t]
                if not keep_going(texts[r]):
                    reasons[r] = "early_stop"
                    continue
            keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            sel = torch.tensor(keep, device=device)
            kv.batch_select_indices(sel)
            mask, last = mask[sel], last[sel]
            live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        last = last + 1
        logits = step(torch.tensor(tokens, device=device)[:, None], mask, last[:, None])
    return list(zip(out, reasons))
