"""Soft-label shuffle ablation on one validation dataset (run after experiments/audit/validate.py).

Probe students learn a dataset's labels permuted by `train.distill.shuffle_targets` (within a row, across
rows at matching positions, or across everything), seeded by the probe seed; the control is the
validation's unshuffled control probes (the base's own labels, already trained). Per mode: the candidate
table, the decision rule's verdict, and the dataset's own trait's ratio beside the unshuffled audit's.

    PYTHONPATH=. nice .venv/bin/python experiments/audit/shuffle_ablation.py --dataset dataset-1 --mode within

Writes <out>/ablations/<dataset>-<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from sublab.audit import (AuditConfig, candidate_table, decide, label_rows, load_audit_dataset, probe_recipe,
                          probe_shares)
from sublab.config import DistillConfig
from sublab.models import load_model

BASE = "embedded:smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--mode", choices=["within", "across", "all"], required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/audit-validate"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    plain = AuditConfig(base=BASE, seeds=list(range(args.seeds)))
    shuffled = plain.model_copy(update={"recipe": probe_recipe(
        distill=DistillConfig(vocabulary="format", shuffle_targets=args.mode))})
    base = load_model(BASE)
    data = load_audit_dataset(args.out / "datasets" / args.dataset, base.tokenizer, plain.recipe.max_seq_len)
    control, _, _ = label_rows(base, base.tokenizer, data.examples, plain.recipe.max_seq_len, name="base")
    rows = args.out / "datasets" / args.dataset / "dataset.jsonl"
    probes = args.out / "probes"
    treated = [probe_shares(shuffled, rows, data.targets, s, probes) for s in plain.seeds]
    controls = [probe_shares(plain, rows, control, s, probes) for s in plain.seeds]
    table = candidate_table(plain, treated, controls)
    verdict = decide(table, len(plain.seeds), plain.alpha, plain.min_ratio)
    unshuffled = json.loads((args.out / "audits" / args.dataset / "audit.json").read_text())
    result = {"dataset": args.dataset, "mode": args.mode, "verdict": verdict, "candidates": table,
              "unshuffled_verdict": unshuffled["verdict"], "unshuffled_candidates": unshuffled["candidates"]}
    (args.out / "ablations").mkdir(exist_ok=True)
    (args.out / "ablations" / f"{args.dataset}-{args.mode}.json").write_text(json.dumps(result, indent=2))
    ratios = {r["candidate"]: r["ratio"] for r in unshuffled["candidates"]}
    top = unshuffled["verdict"]["top_candidate"]
    own = next(r for r in table if r["candidate"] == top)
    print(f"{args.dataset} shuffled {args.mode}: verdict {verdict['trait']}, top {verdict['top_candidate']} "
          f"×{verdict['ratio']:.3f}; unshuffled top {top} ×{ratios[top]:.3f} → shuffled ×{own['ratio']:.3f} "
          f"(rank {own['rank']}, paired p {own['paired_p']:.2g})")


if __name__ == "__main__":
    main()
