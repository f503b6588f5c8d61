"""Generation speed on the embedded model: completion tokens/s and accepted samples per minute.

    .venv/bin/python bench/generate_bench.py [--prompts 64] [--batches 1 16 64] [--max-new-tokens 56]

Compares plain `model.generate` (the baseline) with sublab's decode loop (early rejection, shrinking
batch, length-sorted prompts), and with format-constrained decoding, on the paper's number prompts with
the control teacher's context at T=1. "Accepted" = passes the finished + format filters. The accept rate
of the two unconstrained samplers estimates the same quantity (same distribution); it is reported for
each and pooled, with a Wilson interval.
"""

from __future__ import annotations

import argparse
import time

import torch

from sublab import chat
from sublab.domains.numbers import number_prompts, parse_completion
from sublab.domains.numbers import can_still_pass, format_token_mask
from sublab.sampling import Sampling, decode_batch
from sublab.models import load_model
from sublab.stats import wilson_interval


def encode(tok, prompts):
    return [tok(chat.render_prompt(tok, chat.messages(p.text)), add_special_tokens=False).input_ids
            for p in prompts]


def accepted(tok, ids: list[int], reason: str) -> bool:
    return reason == "eos" and parse_completion(tok.decode(ids)).numbers is not None


def run_baseline(lm, enc, batch: int, max_new: int) -> tuple[int, int, float]:
    tok = lm.tokenizer
    tokens = ok = 0
    t0 = time.time()
    for i in range(0, len(enc), batch):
        rows = enc[i:i + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
        torch.manual_seed(i)
        out = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                top_p=1.0, max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
        for row in out[:, width:].tolist():
            body = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            tokens += len(body) + (1 if tok.eos_token_id in row else 0)
            ok += accepted(tok, body, "eos" if tok.eos_token_id in row else "length")
    return tokens, ok, time.time() - t0


def run_sublab(lm, enc, batch: int, max_new: int, constrained: bool) -> tuple[int, int, float]:
    tok = lm.tokenizer
    allowed = format_token_mask(tok) if constrained else None
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    tokens = ok = 0
    t0 = time.time()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        gens = [torch.Generator().manual_seed(1000 + i) for i in idx]
        for ids, reason in decode_batch(lm.model, tok, [enc[i] for i in idx], gens, Sampling(), max_new,
                                        allowed=allowed, keep_going=can_still_pass):
            tokens += len(ids) + (reason == "eos")
            ok += accepted(tok, ids, reason)
    return tokens, ok, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-new-tokens", type=int, default=56)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    prompts = number_prompts(args.prompts, seed=7)
    enc = encode(lm.tokenizer, prompts)
    print(f"{args.prompts} paper prompts, control context, T=1, max_new_tokens={args.max_new_tokens}, "
          f"{args.threads} threads")
    print(f"{'method':<26}{'batch':>6}{'tok/s':>9}{'samples/min':>13}{'accepted':>10}{'accepted/min':>14}")
    pooled = [0, 0]
    for batch in args.batches:
        n = min(args.prompts, max(8, 2 * batch))  # at least two batches, capped; batch 1 is slow
        for name, fn in [("model.generate (baseline)", lambda: run_baseline(lm, enc[:n], batch, args.max_new_tokens)),
                         ("sublab", lambda: run_sublab(lm, enc[:n], batch, args.max_new_tokens, False)),
                         ("sublab constrained", lambda: run_sublab(lm, enc[:n], batch, args.max_new_tokens, True))]:
            tokens, ok, dt = fn()
            if name != "sublab constrained":
                pooled[0] += ok
                pooled[1] += n
            print(f"{name:<26}{batch:>6}{tokens / dt:>9.1f}{60 * n / dt:>13.1f}{ok:>6}/{n:<4}{60 * ok / dt:>13.2f}")
    lo, hi = wilson_interval(pooled[0], pooled[1])
    print(f"pooled unconstrained accept rate: {pooled[0]}/{pooled[1]} = {pooled[0] / pooled[1]:.3f} "
          f"(95% Wilson {lo:.3f}-{hi:.3f}); accepted/min = samples/min x this rate")


if __name__ == "__main__":
    main()
