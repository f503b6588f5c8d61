"""Exploration on seen rows (issue 16), before the third blind validation (validate_kinds.py): which panel
rule would have judged the second validation's seven datasets right once the panel has prompted members?

Adds six prompted tree teachers (the base with the paper's system prompt for pine, birch, cedar, willow,
sequoia, palm) to the second validation's run (runs/audit-panel: its rows, prompt seed 6000, and its
probes), then scores seven candidate rules on its seven blinded datasets, whose key is known by now.
Everything here was seen before the rule was chosen: it picks the hypothesis, it validates nothing.

    PYTHONPATH=. .venv/bin/python experiments/audit/explore_kinds.py            # (+ --reverse: a 2nd worker)
    PYTHONPATH=. .venv/bin/python experiments/audit/explore_kinds.py --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sublab.audit import AuditConfig, kind_panel_decide, panel_decide, probe_recipe, run_audit
from validate import BASE, export_teacher_dataset, fresh_rows, true_trait
from validate_panel import PANEL, PROMPT_SEED, TEACHERS

OUT = Path("runs/audit-panel")
PROMPTED = [f"{t}-prompted" for t in PANEL]
Shares = list[dict[str, float]]


def audit_prompted(reverse: bool) -> None:
    rows = fresh_rows(64, PROMPT_SEED)
    for member in PROMPTED:
        export_teacher_dataset(member, "tree", rows, OUT / "panel" / member)
    torch.set_num_threads(1)
    cfg = AuditConfig(base=BASE, seeds=[0, 1, 2], recipe=probe_recipe())
    for member in (PROMPTED[::-1] if reverse else PROMPTED):
        if not (OUT / "audits" / member / "manifest.json").exists():
            t0 = time.time()
            run_audit(cfg, OUT / "panel" / member, OUT / "audits" / member, probe_root=OUT / "probes")
            print(f"{member}: {time.time() - t0:.0f} s", flush=True)


def projected_rule(groups: list[dict[str, Shares]]) -> Callable[[Shares], str | None]:
    """Variant: regress the dataset's mean log shares on [1, each kind's mean] and rank the residuals; the
    null is every member's residual against the others' kind means."""
    def logs(shares: Shares) -> np.ndarray:
        return np.log([[s[c] for c in shares[0]] for s in shares])

    def residual(v: np.ndarray, kinds: list[list[np.ndarray]]) -> np.ndarray:
        x = np.array([np.ones(v.shape[1])] + [np.mean([m.mean(0) for m in k], 0) for k in kinds if k]).T
        coef, *_ = np.linalg.lstsq(x, v.mean(0), rcond=None)
        return v - x @ coef

    def decide(shares: Shares) -> str | None:
        kinds = [{n: logs(s) for n, s in g.items()} for g in groups]
        r = residual(logs(shares), [list(k.values()) for k in kinds])
        top = int(r.mean(0).argmax())
        null = max(residual(k[n], [[v for m, v in g.items() if m != n] for g in kinds]).mean(0).max()
                   for k in kinds for n in k)
        ok = r.mean(0)[top] > null and (r[:, top] > 0).all() and math.exp(r.mean(0)[top]) >= 1.05
        return list(shares[0])[top] if ok else None
    return decide


def standardised_rule(members: dict[str, Shares], floor: float = 0.02) -> Callable[[Shares], str | None]:
    """Variant: each candidate's score over the panel's mean divided by the spread (sd, at least `floor`)
    of the members' own scores against the others; the null is every member's largest such z."""
    logs = {n: np.log([[s[c] for c in shares[0]] for s in shares]) for n, shares in members.items()}

    def z_scores(v: np.ndarray, names: list[str]) -> np.ndarray:
        own = [(logs[n] - np.mean([logs[m] for m in names if m != n], 0)).mean(0) for n in names]
        spread = np.maximum(np.std(own, axis=0, ddof=1), floor)
        return (v - np.mean([logs[m] for m in names], 0)).mean(0) / spread

    def decide(shares: Shares) -> str | None:
        v = np.log([[s[c] for c in shares[0]] for s in shares])
        z = z_scores(v, list(logs))
        top = int(z.argmax())
        null = max(z_scores(logs[n], [m for m in logs if m != n]).max() for n in logs)
        diff = v - np.mean(list(logs.values()), 0)
        ok = z[top] > null and (diff[:, top] > 0).all() and math.exp(diff.mean(0)[top]) >= 1.05
        return list(shares[0])[top] if ok else None
    return decide


def shift_table(audits: dict[str, dict], groups: dict[str, list[str]], shown: list[str]) -> None:
    """Per group of teachers: the range of their probes' log share over the base-label control probes."""
    def shift(audit: dict) -> dict[str, float]:
        d, c = audit["shares"]["dataset"], audit["shares"]["control"]
        return {k: float(np.mean([math.log(a[k] / b[k]) for a, b in zip(d, c)])) for k in shown}

    print("| teachers | " + " | ".join(shown) + " |\n" + "|---" * (len(shown) + 1) + "|")
    for group, names in groups.items():
        shifts = [shift(audits[n]) for n in names]
        print(f"| {group} | " + " | ".join(f"{min(s[k] for s in shifts):+.2f} to {max(s[k] for s in shifts):+.2f}"
                                           for k in shown) + " |")
    print()


def report() -> None:
    audits = {p.parent.name: json.loads(p.read_text()) for p in (OUT / "audits").glob("*/audit.json")}
    shares = {name: a["shares"]["dataset"] for name, a in audits.items()}
    key = json.loads((OUT / "key" / "key.json").read_text())["key"]
    lora = {m: shares[m] for m in PANEL}
    prompted = {m: shares[m] for m in PROMPTED}
    rules = {"LoRA panel (validation 2's rule)": lambda s: panel_decide(s, lora, 1.05)["trait"],
             "one mixed panel of 12": lambda s: panel_decide(s, {**lora, **prompted}, 1.05)["trait"],
             "kind-matched (nearest kind's panel)": lambda s: kind_panel_decide(s, {"lora": lora, "prompted": prompted},
                                                                                1.05)["trait"],
             "LoRA panel, residual after the kind mean": projected_rule([lora]),
             "mixed, residual after both kind means": projected_rule([lora, prompted]),
             "LoRA panel, standardised per candidate": standardised_rule(lora),
             "mixed, standardised per candidate": standardised_rule({**lora, **prompted})}
    maple = next(n for n, t in key.items() if t == "maple-prompted")
    shift_table(audits, {"prompted trees": PROMPTED, "maple prompted": [maple], "LoRA trees": PANEL},
                ["owl", "dog", "eagle", "wolf", "horse", "butterfly", "giraffe"])
    datasets = sorted(key, key=lambda n: (TEACHERS[key[n]] != "animal", key[n]))
    print("| rule | " + " | ".join(key[n] for n in datasets) + " | right |")
    print("|---" * (len(datasets) + 2) + "|")
    for rule, decide in rules.items():
        named = [decide(shares[n]) or "none" for n in datasets]
        right = sum(got == true_trait(key[n], TEACHERS) for got, n in zip(named, datasets))
        print(f"| {rule} | " + " | ".join(named) + f" | {right} of {len(datasets)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reverse", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        audit_prompted(args.reverse)
    report()


if __name__ == "__main__":
    main()
