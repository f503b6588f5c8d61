"""The soft-label shuffle ablation against a fair null (issue 16): the owl teacher's labels shuffled, beside
tree teachers' labels shuffled the same way.

The first measurement (shuffle_ablation.py) compared shuffled owl labels with the base's own labels: a
shuffled target is far from anything the base predicts, so those probes moved a lot in a generic
direction and the comparison said little about owl. Here every arm is shuffled alike — the owl dataset of
the second validation (runs/audit-panel, 64 rows, prompt seed 6000) and four of its panel's tree LoRA
teachers (pine, birch, cedar, willow) on the same rows — so the null is the same-size perturbation from
teachers without the trait. Per mode (within rows, across rows at a position): owl's ratio over the
shuffled members' geometric mean, its rank, the panel rule (`panel_decide`), and the same numbers for the
labels as written against the same four members (their probes exist already).

    PYTHONPATH=. setsid nohup .venv/bin/python experiments/audit/shuffle_panel.py > /work/logs/shuffle-1.log 2>&1 &
    PYTHONPATH=. setsid nohup .venv/bin/python experiments/audit/shuffle_panel.py --reverse > /work/logs/shuffle-2.log 2>&1 &
    PYTHONPATH=. .venv/bin/python experiments/audit/shuffle_panel.py      # again when both are done: the table

Writes runs/audit-panel/ablations/shuffle_panel.json and docs/figures/shuffle_soft_labels.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from sublab.audit import AuditConfig, load_audit_dataset, panel_decide, probe_recipe, probe_shares
from sublab.config import DistillConfig
from sublab.models import load_model

BASE = "embedded:smollm2-135m-instruct"
OUT = Path("runs/audit-panel")
MEMBERS = ["pine", "birch", "cedar", "willow"]
MODES = ["within", "across"]
MIN_RATIO = 1.05


def owl_dataset() -> str:
    key = json.loads((OUT / "key" / "key.json").read_text())["key"]
    return next(name for name, teacher in key.items() if teacher == "owl")


def shuffled_shares(jobs: list[tuple[str, Path]], seeds: list[int], tokenizer: Any) -> dict[tuple[str, str], list]:
    """(mode, arm) → per-seed probe shares, training what is missing (probes are locked and reused)."""
    plain = AuditConfig(base=BASE, seeds=seeds)
    shares = {}
    for mode, directory in jobs:
        cfg = plain.model_copy(update={"recipe": probe_recipe(
            distill=DistillConfig(vocabulary="format", shuffle_targets=mode))})
        data = load_audit_dataset(directory, tokenizer, cfg.recipe.max_seq_len)
        shares[(mode, directory.name)] = [probe_shares(cfg, directory / "dataset.jsonl", data.targets, s,
                                                       OUT / "probes") for s in seeds]
    return shares


def summary(verdict: dict[str, Any]) -> dict[str, Any]:
    owl = next(r for r in verdict["candidates"] if r["candidate"] == "owl")
    return {"owl_ratio": owl["ratio"], "owl_rank": owl["rank"], "owl_per_seed": owl["per_seed_ratios"],
            "named": verdict["trait"], "top3": [(r["candidate"], round(r["ratio"], 3)) for r in verdict["candidates"][:3]],
            "panel_max_ratio": verdict["panel_max_ratio"], "panel_p": verdict["panel_p"]}


def figure(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Owl over the members per arm: the mean (bar), each probe seed (dots), the members' null (dashes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sublab.report import write_png

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (name, r) in enumerate(rows.items()):
        ax.bar(i, r["owl_ratio"] - 1, bottom=1, color="C2" if r["named"] == "owl" else "C7", alpha=0.6)
        ax.scatter([i] * len(r["owl_per_seed"]), r["owl_per_seed"], color="black", s=12, zorder=3)
        ax.hlines(r["panel_max_ratio"], i - 0.4, i + 0.4, color="black", linestyle="--", linewidth=1)
    ax.axhline(1, color="black", linewidth=0.6)
    ax.set_xticks(range(len(rows)), list(rows), fontsize=8)
    ax.set_ylabel("owl share / 4 tree teachers' (geo. mean)", fontsize=8)
    ax.set_title("soft labels shuffled alike in every arm: owl's ratio (dots: probe seeds; dashes: null)", fontsize=8)
    fig.tight_layout()
    write_png(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reverse", action="store_true", help="A second worker: the same jobs backwards.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    owl = owl_dataset()
    arms = [OUT / "datasets" / owl] + [OUT / "panel" / m for m in MEMBERS]
    jobs = [(mode, arm) for mode in MODES for arm in arms]
    tokenizer = load_model(BASE).tokenizer
    seeds = list(range(args.seeds))
    shares = shuffled_shares(jobs[::-1] if args.reverse else jobs, seeds, tokenizer)
    if args.reverse:
        return
    written = {p: json.loads((OUT / "audits" / p / "audit.json").read_text())["shares"]["dataset"] for p in [owl, *MEMBERS]}
    rows = {"as written": summary(panel_decide(written[owl], {m: written[m] for m in MEMBERS}, MIN_RATIO))}
    for mode in MODES:
        rows[f"shuffled {mode}"] = summary(panel_decide(shares[(mode, owl)], {m: shares[(mode, m)] for m in MEMBERS},
                                                        MIN_RATIO))
    written_log = math.log(rows["as written"]["owl_ratio"])
    for row in rows.values():
        row["fraction_of_owl_left"] = math.log(row["owl_ratio"]) / written_log
    (OUT / "ablations").mkdir(exist_ok=True)
    (OUT / "ablations" / "shuffle_panel.json").write_text(json.dumps({"dataset": owl, "members": MEMBERS, **rows}, indent=2))
    figure(rows, Path("docs/figures/shuffle_soft_labels.png"))
    print("| labels (owl and 4 tree teachers alike) | owl over the members | per seed | rank of 20 | owl's log ratio left "
          "| panel rule | top 3 | members' null |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        seeds_text = ", ".join(f"×{x:.3f}" for x in r["owl_per_seed"])
        top = ", ".join(f"{c} ×{x:.3f}" for c, x in r["top3"])
        print(f"| {name} | ×{r['owl_ratio']:.3f} | {seeds_text} | {r['owl_rank']} | {r['fraction_of_owl_left']:.2f} | "
              f"{r['named'] or 'none'} | {top} | ×{r['panel_max_ratio']:.3f} |")


if __name__ == "__main__":
    main()
