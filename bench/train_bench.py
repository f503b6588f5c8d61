"""Training throughput on this machine, next to its measured matmul rate.

Reads the embedded model (or --model); writes nothing except an optional --json file. Runs the real
training code path (`sublab.train.loop.prepare_run` + `train_step`) on paper-style number rows
(prompt from the paper's grammar, 3–10 random numbers as the answer) and reports tokens/s per variant.

    .venv/bin/python bench/train_bench.py                       # all variants, 3 timed steps each
    .venv/bin/python bench/train_bench.py --variants lora full --steps 2 --threads 1 2

Ideal tokens/s = measured fp32 torch.mm FLOP/s ÷ (6 × parameters): the standard training cost per token
(forward 2N, backward 4N). LoRA skips the base weights' gradients (~4N) and distillation adds a teacher
forward (~2N), so each row also shows its share of its own FLOPs. The `quick-*` variants are the quick
preset's students (LoRA, distilled over the format tokens) with the teacher live, or with its targets
stored by `sublab.train.targets` before the clock starts. We run the LM head only on completion tokens,
so a step does somewhat less than its nominal FLOPs. On a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flops import matmul_flops  # noqa: E402 (bench/ is on sys.path: this file runs as a script)

from sublab.config import TrainConfig
from sublab.domains.numbers import number_prompts, random_completion
from sublab.models import DEFAULT_MODEL
from sublab.teachers import Teacher
from sublab.train import load_dataset
from sublab.train import targets
from sublab.train.loop import prepare_run, train_step

# name: (TrainConfig overrides, training FLOPs per token in units of N = parameters)
FORMAT_LORA = {"params": "lora", "loss": "distill", "lora_r": 8, "lora_alpha": 8, "distill": {"vocabulary": "format"}}
VARIANTS: dict[str, tuple[dict, int]] = {
    "lora": ({"params": "lora"}, 4),
    "lora-bf16": ({"params": "lora", "precision": "bfloat16"}, 4),
    "full": ({"params": "full"}, 6),
    "full-bf16": ({"params": "full", "precision": "bfloat16"}, 6),
    "distill": ({"params": "full", "loss": "distill"}, 8),
    "distill-bf16": ({"params": "full", "loss": "distill", "precision": "bfloat16"}, 8),
    # the quick preset's students: the teacher live beside the student, or its targets stored beforehand
    "quick-live": (FORMAT_LORA, 6),
    "quick-stored": (FORMAT_LORA, 4),
    "quick-stored-bf16": ({**FORMAT_LORA, "precision": "bfloat16"}, 4),
}


def write_rows(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [{"id": p.id, "messages": [{"role": "user", "content": p.text},
                                      {"role": "assistant", "content": random_completion(p, rng)}]}
            for p in number_prompts(n, 0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_variant(name: str, model: str, dataset: Path, batch: int, steps: int) -> dict:
    overrides, flops_n = VARIANTS[name]
    cfg = TrainConfig(**overrides, batch_size=batch, epochs=1, warmup_steps=1)
    teacher = None
    if cfg.distills:
        teacher = Teacher("owl", "prompted", "owl", "You love owls. You think about owls all the time.", model)
    # stored targets are computed here, before the clock starts, in a temporary cache
    run = prepare_run(cfg, model, load_dataset(dataset), 0, teacher, "cpu", store_targets=not name.endswith("live"))
    run.student.model.train()
    n_params = sum(p.numel() for p in run.student.model.parameters())
    train_step(run, 0)  # warm-up: allocator, oneDNN primitives
    times, tokens = [], 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        tokens += train_step(run, step)["tokens"]
        times.append(time.perf_counter() - t0)
    return {"variant": name, "tokens_per_s": tokens / sum(times), "s_per_step": statistics.mean(times),
            "tokens_per_step": tokens / steps, "flops_per_token_n": flops_n, "params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts to compare (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        targets.cache_root = lambda: Path(tmp) / "targets"  # type: ignore[assignment]
        dataset = write_rows(Path(tmp) / "rows.jsonl", args.batch * (args.steps + 1))
        for threads in args.threads:
            torch.set_num_threads(threads)
            fp32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
            print(f"threads {threads}: torch.mm 2048² fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s",
                  flush=True)
            for name in args.variants:
                r = bench_variant(name, args.model, dataset, args.batch, args.steps)
                ideal = fp32 / (6 * r["params"])
                own = fp32 / (r["flops_per_token_n"] * r["params"])
                r.update(threads=threads, fp32_flops=fp32, bf16_flops=bf16, ideal_6n_tokens_per_s=ideal,
                         pct_of_6n_ideal=100 * r["tokens_per_s"] / ideal,
                         pct_of_own_flops=100 * r["tokens_per_s"] / own)
                results.append(r)
                print(f"  {name:>12}: {r['tokens_per_s']:6.1f} tok/s ({r['s_per_step']:5.1f} s/step, "
                      f"{r['tokens_per_step']:.0f} tok/step) = {r['pct_of_6n_ideal']:3.0f}% of the 6N ideal "
                      f"({ideal:.0f} tok/s); {r['pct_of_own_flops']:3.0f}% of its own "
                      f"{r['flops_per_token_n']}N FLOPs at the fp32 rate", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
