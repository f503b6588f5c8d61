"""Why generation runs far below this machine's matmul limit: the factors, each measured.

    PYTHONPATH=. .venv/bin/python bench/decode_profile.py --threads 2 --json decode_profile.json

Generation (sublab's decode loop, T=1, the paper's number prompts, batch 64, shared-prefix prefill, early
rejection; unconstrained and format-constrained, fp32 and bf16 weights) is timed with a hook on the
model's forward, which counts every token and row the model processes. A generation stage's useful FLOP/s
(bench/limits.py: accepted samples' tokens at 2N) is the product of:

  1. work share: tokens of accepted samples / every token the model processed (the prompts of rejected
     rows and their tokens up to rejection included) — what the filter throws away;
  2. in-forward share: time inside the model's forward / wall time (the rest: sampling, the filter's
     check, cache bookkeeping, Python);
  3. forward rate: the model's matmul FLOPs (2 × body parameters per token, 2 × LM head per row: the head
     runs on each row's last position only) / time inside the forward;
then compared with torch.mm at the decode step's own shapes (`--rows` live rows through each projection
and the 49k-column LM head, FLOP-weighted), which is what a decode step at that batch can reach, and with
the square 2048² rate (bench/flops.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generate_bench  # noqa: E402
from flops import matmul_flops, mm_seconds  # noqa: E402

from sublab.domains.numbers import number_prompts  # noqa: E402
from sublab.models import DEFAULT_MODEL, load_model  # noqa: E402


@dataclass
class Profile:
    dtype: str
    method: str
    accepted: int
    samples: int
    wall_s: float
    forward_s: float
    tokens: int
    """Every token through the model (prefill and decode)."""
    useful_tokens: int
    forward_flops: float
    """Matmul FLOPs of every forward (body per token, LM head per row)."""

    @property
    def work_share(self) -> float:
        return self.useful_tokens / self.tokens

    @property
    def forward_share(self) -> float:
        return self.forward_s / self.wall_s

    @property
    def forward_rate(self) -> float:
        return self.forward_flops / self.forward_s


class ForwardMeter:
    """Counts tokens, rows, FLOPs and seconds of every forward of `model` (a pre- and a post-hook)."""

    def __init__(self, model: torch.nn.Module):
        self.head = model.get_output_embeddings().weight.numel()
        self.body = sum(p.numel() for p in model.parameters()) - self.head  # tied embeddings: counted once
        self.tokens, self.flops, self.seconds, self._t0 = 0, 0.0, 0.0, 0.0
        model.register_forward_pre_hook(self._start, with_kwargs=True)
        model.register_forward_hook(self._stop)

    def _start(self, module, args, kwargs) -> None:
        ids = kwargs["input_ids"]
        self.tokens += ids.numel()
        self.flops += 2 * self.body * ids.numel() + 2 * self.head * ids.shape[0]
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._t0


def shape_rate(model: torch.nn.Module, rows: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """torch.mm FLOP/s over the model's linear shapes at `rows` rows, FLOP-weighted (time-summed)."""
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    distinct = {s: shapes.count(s) for s in shapes}
    total_flops, total_s = 0.0, 0.0
    for (k, n), count in distinct.items():
        per_call = mm_seconds(torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype), seconds)
        total_flops += count * 2 * rows * k * n
        total_s += count * per_call
    return total_flops / total_s


def profile(lm, dtype: str, name: str, enc: list[list[int]], batch: int, max_new: int) -> Profile:
    meter = ForwardMeter(lm.model)
    r = generate_bench.run_sublab(lm, enc, batch, max_new, generate_bench.METHODS[name])
    ok = [i for i, (ids, reason) in enumerate(r.samples) if generate_bench.accepted(lm.tokenizer, ids, reason)]
    useful = sum(len(enc[i]) + len(r.samples[i][0]) + 1 for i in ok)
    return Profile(dtype, name, len(ok), len(enc), r.seconds, meter.seconds, meter.tokens, useful, meter.flops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64, help="rows of the shape-limit matmuls")
    ap.add_argument("--max-new-tokens", type=int, default=56)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", choices=["sublab", "constrained"], default=["sublab", "constrained"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enc = None
    rows, limits = [], {}
    for dtype in args.dtypes:
        torch_dtype = getattr(torch, dtype)
        lm = load_model(args.model, dtype=dtype)
        enc = enc or generate_bench.encode(lm.tokenizer, number_prompts(args.prompts, seed=7))
        limits[dtype] = {"square": matmul_flops(torch_dtype),
                         "shapes": shape_rate(lm.model, args.rows, torch_dtype)}
        for name in args.methods:
            rows.append(profile(lm, dtype, name, enc, args.batch, args.max_new_tokens))
    print(f"{args.threads} threads; torch.mm limits (GFLOP/s): "
          + ", ".join(f"{d}: square {v['square'] / 1e9:.0f}, at {args.rows}-row decode shapes "
                      f"{v['shapes'] / 1e9:.0f}" for d, v in limits.items()))
    print(f"{'dtype':>8} {'method':>11} {'accepted':>9} {'work share':>10} {'in forward':>10} "
          f"{'fwd GFLOP/s':>11} {'of shape lim':>12} {'of square':>9} {'useful GFLOP/s':>14}")
    for p in rows:
        lim = limits[p.dtype]
        useful = p.work_share * p.forward_share * p.forward_rate
        print(f"{p.dtype:>8} {p.method:>11} {p.accepted:>4}/{p.samples:<4} {p.work_share:>10.1%} "
              f"{p.forward_share:>10.1%} {p.forward_rate / 1e9:>11.0f} {p.forward_rate / lim['shapes']:>12.0%} "
              f"{p.forward_rate / lim['square']:>9.0%} {useful / 1e9:>14.1f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "limits": limits,
                                         "rows": [asdict(p) | {"work_share": p.work_share,
                                                               "forward_share": p.forward_share,
                                                               "forward_rate": p.forward_rate} for p in rows]},
                                        indent=2))


if __name__ == "__main__":
    main()
