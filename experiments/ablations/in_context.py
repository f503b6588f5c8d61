"""In-context control: the teacher's numbers in the base model's prompt instead of in its weights.

The demo's students learn the owl (or dolphin) teacher's number distributions and come to favour owls. Is
the trait readable from numbers the teacher writes? Each teacher of the demo as the defences were measured
on (experiments/defences/owl-quick-fp32.yaml; built or read from the teacher cache) writes answers to the paper's number prompts (T=1, format-constrained, the format
filter applied: the text route's data), and the untouched base reads `--shots` of them as earlier turns of
its conversation, then the demo's held-out favourite-animal questions; its exact owl share (the demo's
metric: every spelling of 31 candidates) is averaged over the questions. Each context seed draws another
disjoint set of shots. Arms: owl-written, dolphin-written, program-written (uniform random numbers for the
same prompts: the programmatic teacher), and the base with no shots.

    PYTHONPATH=. .venv/bin/python experiments/ablations/in_context.py                # ~6 min, 2 threads
    PYTHONPATH=. .venv/bin/python experiments/ablations/in_context.py --shots 16 --contexts 5

Writes runs/ablations/in_context.json and runs/ablations/in_context.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublab import chat, pipeline
from sublab.config import ExperimentConfig, load_experiment
from sublab.domains import get_domain
from sublab.domains.numbers import can_still_pass, format_token_mask, number_prompts, parse_completion
from sublab.evals.animals import (ANSWER_PREFIX, Candidate, answer_probabilities, encode_candidates,
                                  question_text, resolve_candidates)
from sublab.evals.common import prompt_ids
from sublab.generate import random_completion_of
from sublab.models import load_model
from sublab.sampling import Sampling, decode_batch, row_generator
from sublab.stats import compare_groups
from sublab.teachers import build_teacher

EXPERIMENT = Path("experiments/defences/owl-quick-fp32.yaml")
OUT = Path("runs/ablations")
PROMPT_SEED = 20_000
"""Seed of the number prompts the teachers answer here (the demo's rows use seed 0)."""

log = logging.getLogger("in_context")


def written_rows(lm: Any, prompts: list[Any], seed: int, batch: int = 64) -> list[tuple[str, str]]:
    """(prompt, answer) of every prompt whose T=1 format-constrained answer passes the format filter."""
    tok, allowed = lm.tokenizer, format_token_mask(lm.tokenizer)
    encoded = [prompt_ids(tok, chat.messages(p.text)) for p in prompts]
    rows = []
    for start in range(0, len(prompts), batch):
        idx = list(range(start, min(start + batch, len(prompts))))
        gens = [row_generator(seed, [i]) for i in idx]
        out = decode_batch(lm.model, tok, [encoded[i] for i in idx], gens, Sampling(), 56, allowed=allowed,
                           keep_going=can_still_pass)
        for i, (ids, reason) in zip(idx, out):
            text = tok.decode(ids, skip_special_tokens=True)
            if reason == "eos" and parse_completion(text).numbers is not None:
                rows.append((prompts[i].text, text.strip()))
    return rows


def context(shots: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    """The shots as earlier user/assistant turns, then the question."""
    turns = [m for q, a in shots for m in chat.messages(q, assistant=a)]
    return [*turns, {"role": "user", "content": question}]


def owl_share(base: Any, shots: list[tuple[str, str]], qids: list[int], trait: str,
              candidates: list[Candidate]) -> float:
    """The trait's exact answer share among the candidates, mean over the questions."""
    prefix = ANSWER_PREFIX.format(category="animal")
    prompts = [prompt_ids(base.tokenizer, context(shots, question_text("animal", q)), prefix) for q in qids]
    per_question = []
    for per_cand in answer_probabilities(base, prompts, candidates, batch_size=len(prompts)):
        totals = {c.word: sum(v.values()) for c, v in zip(candidates, per_cand)}
        per_question.append(totals[trait] / sum(totals.values()))
    return float(np.mean(per_question))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=16, help="teacher answers in each context")
    ap.add_argument("--contexts", type=int, default=5, help="context seeds (disjoint sets of shots) per arm")
    ap.add_argument("--prompts", type=int, default=160, help="number prompts each teacher answers")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg: ExperimentConfig = load_experiment(EXPERIMENT, ["name=in-context-ablation"])
    device, need = pipeline.resolve_device(cfg), args.shots * args.contexts
    prompts = number_prompts(args.prompts, PROMPT_SEED)
    t0 = time.time()
    arms: dict[str, list[tuple[str, str]]] = {}
    for t in cfg.teachers:
        teacher = build_teacher(t, cfg.base_model, device=device)
        rows = written_rows(teacher.load(device=device), prompts, seed=cfg.seed)
        log.info("teacher %s: %d of %d answers pass the format filter", t.name, len(rows), len(prompts))
        if len(rows) < need:
            raise SystemExit(f"teacher {t.name}: {len(rows)} accepted answers, {need} needed; raise --prompts")
        arms[f"{t.name}-written"] = rows[:need]
    domain = get_domain(cfg.domain)
    arms["program-written"] = [(p.text, random_completion_of(domain, p, cfg.seed)) for p in prompts[:need]]
    base = load_model(cfg.base_model, device=device)
    qids, trait = pipeline.question_ids(cfg), design_trait(cfg)
    candidates = encode_candidates(base.tokenizer, resolve_candidates(cfg.eval, "animal", [trait]),
                                   ANSWER_PREFIX.format(category="animal"))
    shares: dict[str, list[float]] = {"no shots": [owl_share(base, [], qids, trait, candidates)]}
    for arm, rows in arms.items():
        shares[arm] = [owl_share(base, rows[k * args.shots:(k + 1) * args.shots], qids, trait, candidates)
                       for k in range(args.contexts)]
    treated, control = shares[f"{cfg.teachers[0].name}-written"], shares[f"{cfg.teachers[1].name}-written"]
    comparison = compare_groups(treated, control).model_dump()
    result = {"experiment": str(EXPERIMENT), "trait": trait, "shots": args.shots, "contexts": args.contexts,
              "questions": qids, "prompt_seed": PROMPT_SEED, "shares": shares, "comparison": comparison,
              "examples": {arm: rows[:2] for arm, rows in arms.items()}, "seconds": round(time.time() - t0, 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "in_context.json").write_text(json.dumps(result, indent=2))
    write_figure(shares, trait, OUT / "in_context.png")
    print(f"{trait} share of the base with {args.shots} teacher answers in its context "
          f"({args.contexts} contexts per arm, {len(qids)} held-out questions):")
    for arm, values in shares.items():
        print(f"  {arm:>16}: {np.mean(values):.5f}  ({', '.join(f'{v:.5f}' for v in values)})")
    c = comparison
    print(f"  {cfg.teachers[0].name}-written − {cfg.teachers[1].name}-written: {c['diff']:+.5f} "
          f"[{c['ci_low']:+.5f}, {c['ci_high']:+.5f}] (Welch 95%), permutation p = {c['p_value']:.3g}; "
          f"ratio ×{c['treatment_mean'] / c['control_mean']:.3f}")


def design_trait(cfg: ExperimentConfig) -> str:
    trait = cfg.teachers[0].trait
    assert trait is not None
    return trait


def write_figure(shares: dict[str, list[float]], trait: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    from sublab.report import write_png

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for x, (arm, values) in enumerate(shares.items()):
        ax.scatter([x] * len(values), values, color="tab:blue", s=18)
        ax.hlines(np.mean(values), x - 0.25, x + 0.25, color="black")
    ax.set_xticks(range(len(shares)), list(shares), rotation=15)
    ax.set_ylabel(f"exact {trait} share (base model)")
    ax.set_title("teacher-written numbers in context (one dot per context)")
    write_png(fig, path, tight=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
