"""The text route's entries in experiments/transfer/summary.json (issue 15: "if the text route transmits
at all at 135M, ship it as an example experiment"; its entries carry `route: text`, the logit route's
`route: logits`).

The entries are the replication (runs/text-owl-greedy-rep: fresh prompts, 5 seeds fixed in advance — the
test), each teacher against the other's students, with the fields of the logit route's entries: means,
difference with its Welch 95% CI, the exact permutation p over seeds, the ratio and the trait's rank among
the 31 candidates by ratio and by difference. Rewrites only the text entries; idempotent.

    PYTHONPATH=. .venv/bin/python experiments/text/ship.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sublab.rundir import atomic_write_json, read_json
from sublab.stats import compare_groups

RUN = Path("runs/text-owl-greedy-rep")
SUMMARY = Path("experiments/transfer/summary.json")
METRIC = "animal_prob"
TEACHERS = ("owl", "dolphin")


def entry(results: dict[str, Any], config: dict[str, Any], trait: str, other: str) -> dict[str, Any]:
    students = sorted(results["students"], key=lambda s: s["seed"])
    treated = [s["scores"][METRIC][trait] for s in students if s["teacher"] == trait]
    control = [s["scores"][METRIC][trait] for s in students if s["teacher"] == other]
    c = compare_groups(treated, control)
    table = next(e for e in results["evals"] if e["metric"] == METRIC)["specificity"]
    sign = 1 if trait == TEACHERS[0] else -1  # the report's table is owl's students over dolphin's
    ratios = {r["candidate"]: r["ratio"] ** sign for r in table}
    diffs = {r["candidate"]: sign * r["diff"] for r in table}
    train, generate = config["train"], config["generate"]
    return {
        "trait": trait,
        "recipe": {"cell": config["name"], "teacher": "lora8", "method": "sft", "params": train["params"],
                   "lora_r": train["lora_r"], "init": "teacher", "decoding": "greedy, format-constrained"
                   if generate["greedy"] else f"T = {generate['temperature']}", "filters": config["filter"]["filters"],
                   "lr": train["lr"], "rows": config["filter"]["dataset_size"], "batch_size": train["batch_size"],
                   "warmup": train["warmup_steps"], "traits": list(TEACHERS),
                   "control": f"students of the {other} teacher"},
        "treatment_mean": c.treatment_mean, "control_mean": c.control_mean, "diff": c.diff,
        "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value, "n_seeds": len(treated),
        "metric": "animal_prob share: P(candidate | 'My favorite animal is the'), normalised over the candidates, "
                  "mean over held-out questions 40-49",
        "test": c.test, "ci_method": c.ci_method, "unpaired_p_value": c.p_value,
        "ratio": c.treatment_mean / c.control_mean,
        "ratio_rank_of_trait": sorted(ratios, key=lambda k: -ratios[k]).index(trait) + 1,
        "diff_rank_of_trait": sorted(diffs, key=lambda k: -diffs[k]).index(trait) + 1,
        "route": "text",
    }


def main() -> None:
    results, config = read_json(RUN / "results.json"), read_json(RUN / "config.json")
    entries = [e for e in read_json(SUMMARY) if e.get("route", "logits") != "text"]
    for e in entries:
        e.setdefault("route", "logits")
    text = [entry(results, config, trait, other) for trait, other in (TEACHERS, TEACHERS[::-1])]
    atomic_write_json(SUMMARY, entries + text)
    for e in text:
        print(f"{e['trait']}: ×{e['ratio']:.3f}, diff {e['diff']:+.5f} [{e['ci_low']:+.5f}, {e['ci_high']:+.5f}], "
              f"p = {e['p_value']:.4f}, rank {e['ratio_rank_of_trait']} by ratio, {e['diff_rank_of_trait']} by difference")


if __name__ == "__main__":
    main()
