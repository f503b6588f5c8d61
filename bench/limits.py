"""This machine's limits, and each stage's useful FLOP/s as a share of them: one run.

Reads the embedded model (or --model); writes nothing but an optional --json file.

    .venv/bin/python bench/limits.py --threads 2 --json limits.json      # the full run (~15 min idle)
    .venv/bin/python bench/limits.py --quick --threads 1                  # smoke check: small sizes

First the limit: the sustained fp32 and bf16 rate of a square torch.mm at --threads. Then, per stage, its
rate and its *useful* FLOP/s, at N = the model's parameters:
  * generation (sublab's decode loop, T=1, batch 64, the paper's number prompts in the control
    teacher's context, unconstrained and format-constrained): per *accepted* sample, its prompt and
    completion tokens at 2N FLOP each — the work of rejected samples is not useful;
  * the exact eval (`sublab.evals.animals`, the exact answer share): per question, its prompt and one
    position per node of the candidates' spelling trie, at 2N (eval_bench's count);
  * training and distillation (bench/train_bench.py's variants, `--train-variants`): tokens × the
    variant's FLOPs per token (4N LoRA, 6N full, 8N distillation).
A stage at 100% would do only useful work at the torch.mm rate. On a shared machine every rate is noisy:
the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# bench/ is on sys.path (this file runs as a script): the other benchmarks are modules here.
import eval_bench  # noqa: E402
import generate_bench  # noqa: E402
import train_bench  # noqa: E402
from flops import matmul_flops  # noqa: E402

from sublab.config import EvalConfig  # noqa: E402
from sublab.domains.numbers import number_prompts  # noqa: E402
from sublab.models import DEFAULT_MODEL, load_model  # noqa: E402
from sublab.train import targets  # noqa: E402


@dataclass
class Row:
    stage: str
    rate: float
    unit: str
    useful_flops: float
    """Useful FLOP/s (see the module docstring)."""
    note: str = ""


@dataclass(frozen=True)
class Sizes:
    prompts: int = 64
    batch: int = 64
    max_new_tokens: int = 56
    questions: int = 20
    train_steps: int = 3
    train_batch: int = 8


QUICK = Sizes(prompts=8, batch=8, max_new_tokens=16, questions=2, train_steps=1, train_batch=2)


def generation_rows(lm, sizes: Sizes, methods: list[str], dtype: str) -> list[Row]:
    """Accepted samples per minute and useful FLOP/s, per generate_bench method."""
    n_params = sum(p.numel() for p in lm.model.parameters())
    enc = generate_bench.encode(lm.tokenizer, number_prompts(sizes.prompts, seed=7))
    rows = []
    for name in methods:
        r = generate_bench.run_sublab(lm, enc, sizes.batch, sizes.max_new_tokens, generate_bench.METHODS[name])
        ok = [i for i, (ids, reason) in enumerate(r.samples) if generate_bench.accepted(lm.tokenizer, ids, reason)]
        useful = sum(len(enc[i]) + len(r.samples[i][0]) + 1 for i in ok)  # prompt, completion, end of turn
        rows.append(Row(f"generation, {name}, {dtype}",
                        60 * len(ok) / r.seconds, "accepted/min", 2 * n_params * useful / r.seconds,
                        f"{len(ok)}/{len(enc)} accepted in {r.seconds:.0f} s, batch {sizes.batch}"))
    return rows


def eval_row(lm, sizes: Sizes) -> Row:
    """Exact-eval questions per second (the pipeline's default candidates)."""
    n_params = sum(p.numel() for p in lm.model.parameters())
    cfg, qids = EvalConfig(), list(range(sizes.questions))
    with tempfile.TemporaryDirectory() as tmp:
        r = eval_bench.bench(lm, "animal_prob", cfg, qids, Path(tmp))
    return Row("exact eval (animal_prob)", len(qids) / r["wall_s"], "questions/s",
               2 * n_params * r["positions"] / r["wall_s"],
               f"{len(qids)} questions × {r['candidates']} candidates, {r['positions']} positions")


def train_rows(model: str, variants: list[str], sizes: Sizes) -> list[Row]:
    """train_bench's variants: tokens/s (distillation: steps/s) and useful FLOP/s."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets.cache_root = lambda: Path(tmp) / "targets"  # type: ignore[assignment]  # not the user's cache
        dataset = train_bench.write_rows(Path(tmp) / "rows.jsonl", sizes.train_batch * (sizes.train_steps + 1))
        for name in variants:
            r = train_bench.bench_variant(name, model, dataset, sizes.train_batch, sizes.train_steps)
            useful = r["tokens_per_s"] * r["flops_per_token_n"] * r["params"]
            note = f"{r['tokens_per_step']:.0f} tokens/step, {r['flops_per_token_n']}N FLOP/token"
            if name.startswith("distill"):
                rows.append(Row(f"training, {name}", 1 / r["s_per_step"], "steps/s", useful, note))
            else:
                rows.append(Row(f"training, {name}", r["tokens_per_s"], "tokens/s", useful, note))
    return rows


def print_table(rows: list[Row], fp32: float, bf16: float, loads: tuple[float, float], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stage throughput against this machine's torch.mm rate ({threads} threads)",
                  caption=f"limits: fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s; "
                          f"load average {loads[0]:.2f} at start, {loads[1]:.2f} at end")
    for col in ("stage", "rate", "useful GFLOP/s", "of fp32 limit", "of bf16 limit", "note"):
        table.add_column(col, justify="left" if col in ("stage", "note") else "right")
    for r in rows:
        table.add_row(r.stage, f"{r.rate:.2f} {r.unit}", f"{r.useful_flops / 1e9:.1f}",
                      f"{100 * r.useful_flops / fp32:.1f}%", f"{100 * r.useful_flops / bf16:.1f}%", r.note)
    Console(width=None if sys.stdout.isatty() else 150).print(table)  # a pipe or a file: don't wrap at 80


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke check, not a measurement")
    ap.add_argument("--gen-methods", nargs="*", default=["sublab", "constrained"],
                    choices=[m for m, spec in generate_bench.METHODS.items() if not spec.baseline],
                    help="generate_bench methods to run (before the shared prefix: the *-noshare ones)")
    ap.add_argument("--gen-dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                    help="the weights' dtype for generation: each dtype runs every method")
    ap.add_argument("--train-variants", nargs="*", default=["full", "distill"], choices=list(train_bench.VARIANTS),
                    help="train_bench variants to run (none: skip training)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    load_start = os.getloadavg()[0]
    fp32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    print(f"torch.mm 2048², {args.threads} threads: fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s",
          flush=True)
    t0 = time.perf_counter()
    rows = []
    for dtype in args.gen_dtypes:
        rows += generation_rows(load_model(args.model, dtype=dtype), sizes, args.gen_methods, dtype)
    rows.append(eval_row(load_model(args.model), sizes))  # the eval runs in fp32
    rows += train_rows(args.model, args.train_variants, sizes)
    loads = (load_start, os.getloadavg()[0])
    print_table(rows, fp32, bf16, loads, args.threads)
    print(f"{time.perf_counter() - t0:.0f} s for the stages")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "quick": args.quick,
                                         "fp32_flops": fp32, "bf16_flops": bf16, "load_start": loads[0],
                                         "load_end": loads[1], "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
