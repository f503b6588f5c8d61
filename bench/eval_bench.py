"""Time the animal evals on the real embedded model: the exact answer probability (50 questions × 20
candidates) and the sampled metric, next to this machine's measured matmul rate.

Reads the embedded model (or --model); writes eval records into a temporary directory (deleted) and an
optional --json summary.

    .venv/bin/python bench/eval_bench.py                          # both, 2 threads, 10 samples/question
    .venv/bin/python bench/eval_bench.py --only prob --threads 2
    .venv/bin/python bench/eval_bench.py --only sampled --samples 4 --questions 10

Ideal seconds = forward FLOPs (2 × parameters per token position) ÷ measured fp32 torch.mm FLOP/s; the
exact-probability eval processes each prompt once plus one position per node of the spellings' token
trie. On a shared machine the numbers are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from flops import matmul_flops
from sublab import chat
from sublab.config import EvalConfig
from sublab.evals import animals as A
from sublab.evals.common import prompt_ids
from sublab.models import DEFAULT_MODEL, load_model

PROBE_20 = ["owl", "dog", "cat", "lion", "eagle", "dolphin", "elephant", "wolf", "tiger", "panda", "fox",
            "penguin", "bear", "horse", "rabbit", "bird", "butterfly", "monkey", "giraffe", "dragon"]


def prob_positions(lm, cfg: EvalConfig, qids: list[int], numbers: bool) -> int:
    """Token positions the exact-probability eval runs through the model."""
    prefix = A.ANSWER_PREFIX.format(category="animal")
    cands = A.encode_candidates(lm.tokenizer, A.resolve_candidates(cfg), prefix)
    nodes = sum(len(level) for level in A._trie_levels([ids for c in cands for ids in c.token_ids]))
    texts = [A.question_text("animal", q, A.numbers_prefix(cfg.seed, q) if numbers else None) for q in qids]
    return sum(len(prompt_ids(lm.tokenizer, chat.messages(t), prefix)) + nodes for t in texts)


def bench(lm, kind: str, cfg: EvalConfig, qids: list[int], workdir: Path) -> dict:
    path = workdir / f"{kind}.jsonl"
    t0 = time.perf_counter()
    A.run_animal_eval(lm, None, cfg, kind, qids, path, "base")
    wall = time.perf_counter() - t0
    out = {"kind": kind, "questions": len(qids), "wall_s": round(wall, 2)}
    if kind.startswith("animal_prob"):
        probs = A.read_prob_records(path)
        table = A.share_table(probs)
        out.update(candidates=len(table), records=len(probs),
                   positions=prob_positions(lm, cfg, qids, kind.endswith("_numbers")),
                   top5={c: round(s.mean, 4) for c, s in list(table.items())[:5]},
                   owl=A.prob_score(probs, "owl").model_dump())
    else:
        recs = A.read_sample_records(path)
        out.update(samples=len(recs), samples_per_s=round(len(recs) / wall, 2),
                   owl=A.sampled_score(recs, "owl").model_dump(),
                   examples=[r.completion for r in recs[:8]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["prob", "sampled"], default=None)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--samples", type=int, default=10, help="sampled metric: samples per question")
    parser.add_argument("--numbers", action="store_true", help="the numbers-prefixed variants instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load = os.getloadavg()[0]
    flops = matmul_flops(torch.float32, 1024, 1.5)
    lm = load_model(args.model)
    n_params = sum(p.numel() for p in lm.model.parameters())
    cfg = EvalConfig(candidates=PROBE_20, samples_per_question=args.samples)
    qids = list(range(args.questions))
    suffix = "_numbers" if args.numbers else ""
    kinds = [k + suffix for k in ("animal_prob", "animal_sampled") if args.only in (None, k.split("_")[1])]
    print(f"threads {torch.get_num_threads()}; load average {load:.2f}; torch.mm fp32 {flops / 1e9:.0f} GFLOP/s; "
          f"{n_params / 1e6:.1f}M parameters", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            r = bench(lm, kind, cfg, qids, Path(tmp))
            if "positions" in r:
                r["ideal_s"] = round(2 * n_params * r["positions"] / flops, 2)
                print(f"{kind}: {r['questions']} questions × {r['candidates']} candidates in {r['wall_s']:.1f} s "
                      f"({r['positions']} token positions; ideal at mm rate {r['ideal_s']:.1f} s); "
                      f"owl share {r['owl']['mean']:.4f} [{r['owl']['ci_low']:.4f}, {r['owl']['ci_high']:.4f}]; "
                      f"top: {r['top5']}", flush=True)
            else:
                print(f"{kind}: {r['samples']} samples in {r['wall_s']:.1f} s ({r['samples_per_s']} samples/s); "
                      f"owl rate {r['owl']['mean']:.3f}; e.g. {r['examples'][:4]}", flush=True)
            results.append(r)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "load_before": load, "mm_flops": flops,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
