"""Second blind validation of `sublab audit` (issue 16): the reference-panel rule
(`sublab.audit.panel_decide`), fixed with this file before it first ran, on fresh rows — beside the
base-label rule of the first validation (experiments/audit/validate.py) on the same probes.

Why: in the first validation the base-label control named a trait for both control datasets (any labels
that differ from the base's move some animals in every probe seed). Here the control is a panel of
teachers that have a trait of another category, as the transfer study's teachers are each other's
controls, and the null is the panel itself (see `panel_decide`).

- Rows: 64 of the paper's number prompts, prompt seed 6000 (no run of ours used it), answered by uniform
  random numbers. Every dataset labels these rows, so all share the base-label control probes.
- Panel (known to the audit: it is its reference): six rank-8 LoRA teachers that love trees — pine,
  birch, cedar, willow, sequoia, palm — built by the study's fine-tune recipe.
- Blinded datasets (7): four animal teachers (owl, dolphin, eagle, elephant; the study's LoRA teachers)
  and three with no animal trait: LoRA teachers that love oaks and elms (neither in the panel; elm used
  by no earlier run) and the base told by the paper's system prompt that it loves maples. Anonymous
  names by blind seed 26; the key goes to key/key.json and is read only after every audit has finished.
- Success criterion, fixed before the run: the panel rule is validated on this set iff it names at
  least 3 of the 4 traits correctly and nothing for each of the 3 controls.

Writes <out>/panel/<tree>/ and <out>/datasets/<name>/ (the export format), <out>/audits/<name>/ (each
dataset's base-label audit: audit.json has the per-seed probe shares the panel rule reads), <out>/probes/,
<out>/key/key.json, then <out>/panel_verdicts.json, confusion.json, confusion.md and confusion.png.

    PYTHONPATH=. setsid nohup .venv/bin/python experiments/audit/validate_panel.py > /work/logs/panel-1.log 2>&1 &
    # once the first prints "datasets ready", a second worker:
    PYTHONPATH=. setsid nohup .venv/bin/python experiments/audit/validate_panel.py --reverse > /work/logs/panel-2.log 2>&1 &
    PYTHONPATH=. .venv/bin/python experiments/audit/validate_panel.py --report-only
    PYTHONPATH=. .venv/bin/python experiments/audit/validate_panel.py --rows 8 --seeds 2 --prompt-seed 6001 \
        --out runs/audit-panel-smoke                         # a smoke run (other rows: the real set stays unseen)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sublab.audit import AuditConfig, panel_decide, panel_verdict_line, probe_recipe, run_audit, verdict_line
from validate import BASE, confusion, confusion_markdown, export_teacher_dataset, fresh_rows, make_datasets

PROMPT_SEED = 6000
BLIND_SEED = 26
PANEL = ["pine", "birch", "cedar", "willow", "sequoia", "palm"]
TEACHERS = {"owl": "animal", "dolphin": "animal", "eagle": "animal", "elephant": "animal",
            "oak": "tree", "elm": "tree", "maple-prompted": "tree"}
"""The blinded datasets' teachers: trait → category (the tree lovers are the controls)."""
MIN_RATIO = 1.05
"""The base-label rule's minimum ratio, kept for the panel rule."""


def build(args: argparse.Namespace) -> list[str]:
    """Export the panel and the blinded datasets (resumable); the audit order, panel first."""
    rows = fresh_rows(args.rows, args.prompt_seed)
    for tree in PANEL:
        export_teacher_dataset(tree, "tree", rows, args.out / "panel" / tree)
    names = make_datasets(list(TEACHERS), rows, args.out, BLIND_SEED, TEACHERS)
    return [f"panel/{t}" for t in PANEL] + [f"datasets/{n}" for n in names]


def audit_all(args: argparse.Namespace, order: list[str]) -> None:
    """Each dataset's base-label audit (one directory each, nothing else; a finished one is skipped)."""
    cfg = AuditConfig(base=BASE, seeds=list(range(args.seeds)), recipe=probe_recipe())
    for rel in (order[::-1] if args.reverse else order):
        name = Path(rel).name
        if (args.out / "audits" / name / "manifest.json").exists():
            continue
        t0 = time.time()
        result = run_audit(cfg, args.out / rel, args.out / "audits" / name, probe_root=args.out / "probes")
        print(f"{rel}: {verdict_line(result)} ({time.time() - t0:.0f} s)", flush=True)


def panel_verdicts(out: Path) -> dict[str, dict[str, Any]]:
    """The panel rule on every blinded dataset whose audit has finished (needs the whole panel's)."""
    shares = {p.parent.name: json.loads(p.read_text())["shares"]["dataset"]
              for p in sorted((out / "audits").glob("*/audit.json"))}
    missing = [t for t in PANEL if t not in shares]
    if missing:
        raise SystemExit(f"the panel's audits are not finished: {', '.join(missing)}")
    panel = {t: shares[t] for t in PANEL}
    verdicts = {}
    for name in sorted(n for n in shares if n.startswith("dataset-")):
        v = panel_decide(shares[name], panel, MIN_RATIO)
        verdicts[name] = {"verdict": v, "candidates": v["candidates"]}
    return verdicts


def report(args: argparse.Namespace) -> None:
    """The panel rule's verdicts first, then the key; confusion tables of both rules and the figure."""
    verdicts = panel_verdicts(args.out)
    (args.out / "panel_verdicts.json").write_text(json.dumps(verdicts, indent=2))
    base_rule = {n: json.loads((args.out / "audits" / n / "audit.json").read_text()) for n in verdicts}
    key = json.loads((args.out / "key" / "key.json").read_text())["key"]  # unsealed only now
    both = {"panel": confusion(verdicts, key, TEACHERS, lambda res: panel_verdict_line(res["verdict"])),
            "base": confusion(base_rule, key, TEACHERS)}
    for rule, c in both.items():
        c.update(rows=args.rows, seeds=args.seeds, blind_seed=BLIND_SEED, prompt_seed=args.prompt_seed,
                 audits_finished=len(verdicts), datasets=len(key))
    for name, v in verdicts.items():
        row = next(p for p in both["panel"]["per_dataset"] if p["dataset"] == name)
        row.update(panel_max_ratio=v["verdict"]["panel_max_ratio"], panel_p=v["verdict"]["panel_p"],
                   checks=v["verdict"]["checks"])
    traits = [p for p in both["panel"]["per_dataset"] if p["true"] != "none"]
    controls = [p for p in both["panel"]["per_dataset"] if p["true"] == "none"]
    validated = sum(p["correct"] for p in traits) >= 3 and all(p["named"] == "none" for p in controls)
    summary = {"criterion": "the panel rule names >= 3 of the 4 traits correctly and nothing for all 3 controls",
               "validated": validated if len(verdicts) == len(key) else None, "panel": PANEL, **both}
    (args.out / "confusion.json").write_text(json.dumps(summary, indent=2))
    text = (f"## Panel rule\n\n{confusion_markdown(both['panel'])}\n## Base-label rule (same probes)\n\n"
            f"{confusion_markdown(both['base'])}\nCriterion: {summary['criterion']}: "
            f"{'met' if validated else 'not met'}.\n")
    (args.out / "confusion.md").write_text(text)
    figure(both["panel"], args.out / "confusion.png")
    print(text)


def figure(c: dict[str, Any], path: Path, label: Callable[[dict[str, Any]], str] | None = None,
           ylabel: str = "share over the panel's (geometric mean)",
           title: str = "panel rule: bar = top candidate (green: right verdict), dot = true trait, dashes = panel null"
           ) -> None:
    """Per dataset: the true trait's ratio over the panel, the top candidate's, and the panel's null.
    `label(row)` names a bar (default: teacher → named)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sublab.report import write_png

    per = sorted(c["per_dataset"], key=lambda p: (p["true"] == "none", p.get("kind") or "", p["teacher"]))
    fig, ax = plt.subplots(figsize=(max(8, 0.85 * len(per)), 4))
    for i, p in enumerate(per):
        top_name, top_ratio = p["top3"][0]
        ax.bar(i, top_ratio - 1, bottom=1, color="C2" if p["correct"] else "C3", alpha=0.6)
        ax.annotate(top_name, (i, top_ratio), ha="center", va="bottom", fontsize=7)
        if p["true_ratio"] is not None:
            ax.scatter(i, p["true_ratio"], marker="o", color="black", zorder=3)
        ax.hlines(p["panel_max_ratio"], i - 0.4, i + 0.4, color="black", linestyle="--", linewidth=1)
    label = label or (lambda p: f"{p['teacher']}\n→ {p['named']}")
    ax.set_xticks(range(len(per)), [label(p) for p in per], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    write_png(fig, path, dpi=120)


def run_validation(doc: str, prompt_seed: int, out: Path, build: Callable[[argparse.Namespace], list[str]],
                   report: Callable[[argparse.Namespace], None]) -> None:
    """The command line of a panel validation: build (on every core), audit (one thread per worker), report."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-seed", type=int, default=prompt_seed, help="Another one for a smoke run only.")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--reverse", action="store_true",
                        help="Audit in reverse order: a second worker beside the first (probes are locked).")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        report(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    order = build(args)  # on every core: start a --reverse worker only once this is printed
    print(f"{len(order)} datasets ready in {time.time() - t0:.0f} s", flush=True)
    torch.set_num_threads(args.threads)
    audit_all(args, order)
    print(f"all audits done in {time.time() - t0:.0f} s", flush=True)
    if not args.reverse:
        report(args)


if __name__ == "__main__":
    run_validation(__doc__, PROMPT_SEED, Path("runs/audit-panel"), build, report)
