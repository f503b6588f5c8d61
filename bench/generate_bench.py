"""Generation speed on the embedded model: completion tokens/s and accepted samples per minute.

    .venv/bin/python bench/generate_bench.py [--prompts 64] [--batches 1 16 64] [--max-new-tokens 56]
    .venv/bin/python bench/generate_bench.py --batches 64 --methods sublab-noshare sublab \
        constrained-noshare constrained --dtypes float32 bfloat16 --threads 1

Compares plain `model.generate` (the baseline) with sublab's decode loop (early rejection, shrinking
batch, length-sorted prompts), with and without prefilling the batch's shared prompt prefix once, and
with format-constrained decoding, on the paper's number prompts with the control teacher's context at
T=1. "Accepted" = passes the finished + format filters. The accept rate of the unconstrained samplers
estimates one quantity (same distribution); it is reported for each and pooled, with a Wilson interval.
Every method runs back to back in one process: read the ratios. "same" counts the samples identical,
token for token, to those of the first sublab method of the same kind (same seeds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sublab import chat
from sublab.domains.numbers import can_still_pass, format_token_mask, number_prompts, parse_completion
from sublab.models import load_model
from sublab.sampling import Sampling, decode_batch
from sublab.stats import wilson_interval

Sample = tuple[list[int], str]


@dataclass(frozen=True)
class Method:
    """One way to generate: `model.generate`, or sublab's loop with these options."""

    label: str
    baseline: bool = False
    constrained: bool = False
    share_prefix: bool = True


METHODS = {
    "baseline": Method("model.generate (baseline)", baseline=True),
    "sublab-noshare": Method("sublab, no prefix sharing", share_prefix=False),
    "sublab": Method("sublab (shared prefix)"),
    "constrained-noshare": Method("constrained, no sharing", constrained=True, share_prefix=False),
    "constrained": Method("constrained (shared prefix)", constrained=True),
}


@dataclass
class Result:
    samples: list[Sample]
    """(token ids, stop reason) per prompt, in prompt order."""
    seconds: float


def encode(tok: Any, prompts: list[Any]) -> list[list[int]]:
    return [tok(chat.render_prompt(tok, chat.messages(p.text)), add_special_tokens=False).input_ids
            for p in prompts]


def accepted(tok: Any, ids: list[int], reason: str) -> bool:
    return reason == "eos" and parse_completion(tok.decode(ids)).numbers is not None


def run_baseline(lm: Any, enc: list[list[int]], batch: int, max_new: int) -> Result:
    tok = lm.tokenizer
    samples: list[Sample] = []
    t0 = time.perf_counter()
    for i in range(0, len(enc), batch):
        rows = enc[i:i + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
        torch.manual_seed(i)
        out = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                top_p=1.0, max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
        for row in out[:, width:].tolist():
            ended = tok.eos_token_id in row
            samples.append((row[:row.index(tok.eos_token_id)] if ended else row, "eos" if ended else "length"))
    return Result(samples, time.perf_counter() - t0)


def run_sublab(lm: Any, enc: list[list[int]], batch: int, max_new: int, method: Method) -> Result:
    """Length-sorted batches, per-prompt generators seeded by the prompt index, early rejection."""
    tok = lm.tokenizer
    allowed = format_token_mask(tok) if method.constrained else None
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    samples: dict[int, Sample] = {}
    t0 = time.perf_counter()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        gens = [torch.Generator().manual_seed(1000 + i) for i in idx]
        out = decode_batch(lm.model, tok, [enc[i] for i in idx], gens, Sampling(), max_new, allowed=allowed,
                           keep_going=can_still_pass, share_prefix=method.share_prefix)
        samples.update(zip(idx, out))
    return Result([samples[i] for i in range(len(enc))], time.perf_counter() - t0)


def run(lm: Any, enc: list[list[int]], batch: int, max_new: int, method: Method) -> Result:
    return (run_baseline(lm, enc, batch, max_new) if method.baseline
            else run_sublab(lm, enc, batch, max_new, method))


def n_tokens(samples: list[Sample]) -> int:
    """Decoded tokens, the end-of-turn token included."""
    return sum(len(ids) + (reason == "eos") for ids, reason in samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-new-tokens", type=int, default=56)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                    help="one model per dtype; the sublab methods run in each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {d: load_model(dtype=d) for d in args.dtypes}
    enc = encode(models[args.dtypes[0]].tokenizer, number_prompts(args.prompts, seed=7))
    print(f"{args.prompts} paper prompts, control context, T=1, max_new_tokens={args.max_new_tokens}, "
          f"{args.threads} threads, dtypes {' '.join(args.dtypes)}")
    print(f"{'method':<30}{'dtype':>9}{'batch':>6}{'tok/s':>8}{'samples/min':>12}{'accepted':>10}"
          f"{'accepted/min':>13}{'same':>9}")
    pooled = [0, 0]
    for batch in args.batches:
        n = min(args.prompts, max(8, 2 * batch))  # at least two batches, capped; batch 1 is slow
        first: dict[bool, list[Sample]] = {}  # constrained → the first sublab method's samples
        for name in args.methods:
            method = METHODS[name]
            for dtype, lm in models.items():
                if method.baseline and dtype != args.dtypes[0]:
                    continue
                r = run(lm, enc[:n], batch, args.max_new_tokens, method)
                ok = sum(accepted(lm.tokenizer, ids, reason) for ids, reason in r.samples)
                if not method.constrained:
                    pooled[0] += ok
                    pooled[1] += n
                same = ""
                if not method.baseline:
                    ref = first.setdefault(method.constrained, r.samples)
                    same = f"{sum(a == b for a, b in zip(ref, r.samples))}/{n}"
                print(f"{method.label:<30}{dtype:>9}{batch:>6}{n_tokens(r.samples) / r.seconds:>8.1f}"
                      f"{60 * n / r.seconds:>12.1f}{ok:>6}/{n:<4}{60 * ok / r.seconds:>12.2f}{same:>9}", flush=True)
    if pooled[1]:
        lo, hi = wilson_interval(pooled[0], pooled[1])
        print(f"pooled unconstrained accept rate: {pooled[0]}/{pooled[1]} = {pooled[0] / pooled[1]:.3f} "
              f"(95% Wilson {lo:.3f}-{hi:.3f}); accepted/min = samples/min x this rate")


if __name__ == "__main__":
    main()
