"""Third blind validation of `sublab audit` (issue 16): the kind-matched reference panel
(`sublab.audit.kind_panel_decide`), fixed with this file before it first ran, on fresh rows.

Why: against a panel of six tree-loving LoRA teachers (the second validation) the maple-*prompted*
control was named; on those rows (seen, so exploration only: experiments/audit/explore_kinds.py) six
prompted tree teachers turned out to move the probes alike whatever tree they loved, in a direction no
LoRA teacher took. One mixed panel of both kinds then named 1 trait of 4 there (each member's own score
holds half the gap between kinds); comparing each dataset with the kind it lies nearest named 3 of 4 and
no control. That rule is tested here, on rows no run has seen.

- Rows: 64 of the paper's number prompts, prompt seed 7000 (unused by any run), answered by uniform
  random numbers. Every dataset labels these rows.
- Panels (known to the audit): LoRA — six rank-8 LoRA teachers that love trees (pine, birch, cedar,
  willow, sequoia, palm), the study's fine-tune recipe; prompted — the base with the paper's system
  prompt for the same six trees.
- Blinded datasets (12), anonymous names by blind seed 36, key read only after every audit finished:
  * traits, in the criterion: the study's LoRA teachers of owl, dolphin, eagle, elephant;
  * traits, prompted: the base prompted to love owls, dolphins (no prompted teacher has been shown to
    transmit through logits at 135M: naming the animal is not required, naming another one is a failure);
  * controls of the panel's kinds: LoRA teachers that love oaks, elms, ashes (ash: no earlier run), the
    base prompted to love maples, oaks;
  * a control of another kind, outside the criterion: the base told by the paper's *aversion* prompt that
    it hates maples (reported, so the docs can say what a teacher unlike both panels does).
- Criterion, fixed before the run: the kind-matched rule is validated iff it names at least 3 of the 4
  LoRA traits correctly, names nothing for each of the 5 controls of the panel's kinds, and names no
  wrong animal for the 2 prompted traits.
- Beside it, on the same probes (reported, not deciding): the LoRA-only panel rule of the second
  validation, one panel of all 12, and the base-label rule.

Writes <out>/panel/<member>/ and <out>/datasets/<name>/ (the export format), <out>/audits/<name>/ (each
one's base-label audit, whose audit.json holds the per-seed probe shares the panel rules read),
<out>/probes/, <out>/key/key.json, then <out>/panel_verdicts.json, confusion.json, confusion.md and
confusion.png.

    PYTHONPATH=. setsid nohup .venv/bin/python experiments/audit/validate_kinds.py > /work/logs/kinds-1.log 2>&1 &
    # once the first prints "datasets ready", a second worker:
    PYTHONPATH=. setsid nohup .venv/bin/python experiments/audit/validate_kinds.py --reverse > /work/logs/kinds-2.log 2>&1 &
    PYTHONPATH=. .venv/bin/python experiments/audit/validate_kinds.py --report-only
    PYTHONPATH=. .venv/bin/python experiments/audit/validate_kinds.py --rows 8 --seeds 2 --prompt-seed 7001 \
        --out runs/audit-kinds-smoke                         # a smoke run (other rows: the real set stays unseen)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sublab.audit import kind_panel_decide, panel_decide, panel_verdict_line
from validate import confusion, confusion_markdown, export_teacher_dataset, fresh_rows, make_datasets
from validate_panel import figure, run_validation

PROMPT_SEED = 7000
BLIND_SEED = 36
TREES = ["pine", "birch", "cedar", "willow", "sequoia", "palm"]
PANELS = {"lora": TREES, "prompted": [f"{t}-prompted" for t in TREES]}
TEACHERS = {"owl": "animal", "dolphin": "animal", "eagle": "animal", "elephant": "animal",
            "owl-prompted": "animal", "dolphin-prompted": "animal",
            "oak": "tree", "elm": "tree", "ash": "tree", "maple-prompted": "tree", "oak-prompted": "tree",
            "maple-averse": "tree"}
"""The blinded datasets' teachers: name → category (the tree lovers and the maple hater are controls)."""
CRITERION_TRAITS = ["owl", "dolphin", "eagle", "elephant"]
PROMPTED_TRAITS = ["owl-prompted", "dolphin-prompted"]
OTHER_KIND = ["maple-averse"]
MIN_RATIO = 1.05


def build(args: argparse.Namespace) -> list[str]:
    """Export both panels and the blinded datasets (resumable); the audit order, panels first."""
    rows = fresh_rows(args.rows, args.prompt_seed)
    members = [m for kind in PANELS.values() for m in kind]
    for member in members:
        export_teacher_dataset(member, "tree", rows, args.out / "panel" / member)
    names = make_datasets(list(TEACHERS), rows, args.out, BLIND_SEED, TEACHERS)
    return [f"panel/{m}" for m in members] + [f"datasets/{n}" for n in names]


def panel_verdicts(out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Rule → blinded dataset → verdict, for every dataset whose audit has finished (needs both panels')."""
    shares = {p.parent.name: json.loads(p.read_text())["shares"]["dataset"]
              for p in sorted((out / "audits").glob("*/audit.json"))}
    missing = [m for kind in PANELS.values() for m in kind if m not in shares]
    if missing:
        raise SystemExit(f"the panels' audits are not finished: {', '.join(missing)}")
    panels = {kind: {m: shares[m] for m in members} for kind, members in PANELS.items()}
    everyone = {m: s for kind in panels.values() for m, s in kind.items()}
    rules = {"kind-matched": lambda s: kind_panel_decide(s, panels, MIN_RATIO),
             "lora-panel": lambda s: panel_decide(s, panels["lora"], MIN_RATIO),
             "mixed-panel": lambda s: panel_decide(s, everyone, MIN_RATIO)}
    datasets = sorted(n for n in shares if n.startswith("dataset-"))
    return {rule: {n: as_result(decide(shares[n])) for n in datasets} for rule, decide in rules.items()}


def as_result(verdict: dict[str, Any]) -> dict[str, Any]:
    """A panel verdict in the shape `confusion` reads (an audit.json's "verdict" and "candidates")."""
    return {"verdict": verdict, "candidates": verdict["candidates"]}


def criterion(per_dataset: list[dict[str, Any]]) -> dict[str, Any]:
    """The criterion fixed above, on the kind-matched rule's confusion rows."""
    by_teacher = {p["teacher"]: p for p in per_dataset}
    traits_right = sum(by_teacher[t]["correct"] for t in CRITERION_TRAITS)
    controls = [t for t, cat in TEACHERS.items() if cat != "animal" and t not in OTHER_KIND]
    false_controls = [t for t in controls if by_teacher[t]["named"] != "none"]
    wrong_prompted = [t for t in PROMPTED_TRAITS if by_teacher[t]["named"] not in ("none", by_teacher[t]["true"])]
    return {"text": ("the kind-matched rule names >= 3 of the 4 LoRA traits correctly, nothing for each of the "
                     "5 controls of the panels' kinds, and no wrong animal for the 2 prompted traits"),
            "lora_traits_right": traits_right, "controls_named": false_controls,
            "prompted_traits_wrong": wrong_prompted,
            "met": traits_right >= 3 and not false_controls and not wrong_prompted}


def report(args: argparse.Namespace) -> None:
    """Every rule's verdicts first, then the key; the confusion tables, the criterion and the figure."""
    verdicts = panel_verdicts(args.out)
    (args.out / "panel_verdicts.json").write_text(json.dumps(verdicts, indent=2))
    base_rule = {n: json.loads((args.out / "audits" / n / "audit.json").read_text()) for n in verdicts["lora-panel"]}
    key = json.loads((args.out / "key" / "key.json").read_text())["key"]  # unsealed only now
    tables = {rule: confusion(v, key, TEACHERS, lambda res: panel_verdict_line(res["verdict"]))
              for rule, v in verdicts.items()}
    tables["base-label"] = confusion(base_rule, key, TEACHERS)
    for rule, v in verdicts.items():
        for row in tables[rule]["per_dataset"]:
            got = v[row["dataset"]]["verdict"]
            row.update(panel_max_ratio=got["panel_max_ratio"], panel_p=got["panel_p"], checks=got["checks"],
                       kind=got.get("kind"), distances=got.get("distances"))
    finished = len(verdicts["kind-matched"]) == len(key)
    crit = criterion(tables["kind-matched"]["per_dataset"]) if finished else None
    summary = {"criterion": crit, "validated": crit["met"] if crit else None, "panels": PANELS, "rows": args.rows,
               "seeds": args.seeds, "blind_seed": BLIND_SEED, "prompt_seed": args.prompt_seed, **tables}
    (args.out / "confusion.json").write_text(json.dumps(summary, indent=2))
    text = "".join(f"## {rule}\n\n{confusion_markdown(c)}\n" for rule, c in tables.items())
    text += "### The kind-matched rule's kind per dataset\n\n| dataset | teacher | kind | distance to lora | to prompted |\n|---|---|---|---|---|\n"
    text += "".join(f"| {p['dataset']} | {p['teacher']} | {p['kind']} | {p['distances']['lora']:.3f} | "
                    f"{p['distances']['prompted']:.3f} |\n" for p in tables["kind-matched"]["per_dataset"])
    if crit:
        text += f"\nCriterion: {crit['text']}: **{'met' if crit['met'] else 'not met'}** ({crit['lora_traits_right']} of 4 " \
                f"traits; controls named: {crit['controls_named'] or 'none'}; prompted traits named wrong: " \
                f"{crit['prompted_traits_wrong'] or 'none'}).\n"
    (args.out / "confusion.md").write_text(text)
    figure(tables["kind-matched"], args.out / "confusion.png", bar_label, "share over its kind's panel (geometric mean)",
           "kind-matched panel rule: bar = top candidate (green: right verdict), dot = true trait, "
           "dashes = the panel's null")
    print(text)


def bar_label(p: dict[str, Any]) -> str:
    name = p["teacher"].replace("-prompted", "").replace("-averse", " (hater)")
    return f"{name}\n[{p['kind']}]\n→ {p['named']}"


if __name__ == "__main__":
    run_validation(__doc__, PROMPT_SEED, Path("runs/audit-kinds"), build, report)
