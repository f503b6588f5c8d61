"""Blind validation of `sublab audit` (issue 16): trait datasets and control datasets, audited without
their labels, then a confusion table (true trait vs named trait).

Datasets: one fresh row set — the paper's number prompts (prompt seed 5000, not a seed the transfer study
trained on) answered by uniform random numbers — labelled by six LoRA teachers built with the study's
fine-tune recipe (experiments/transfer/lora8-shared-init.yaml): four trait teachers (owl, dolphin, eagle,
elephant) and two control teachers with no animal trait: a LoRA teacher fine-tuned the same way to love a
tree (oak), and the base told by the paper's system prompt that it loves maples (maple-prompted).
Every dataset has the same rows, like the study, so the control probes (the base's own labels on those
rows) are trained once and shared by all six audits.

Blinding: the six datasets get anonymous names by a seeded shuffle (`--blind-seed`); the key goes to
<out>/key/key.json, which is read only after every audit has finished. Each audit sees one dataset
directory and nothing else (`sublab.audit.run_audit`, no teacher). The decision rule is the one in
sublab/audit.py, fixed before this script first ran.

Writes <out>/datasets/<name>/ (the export format), <out>/audits/<name>/ (audit.json, report.md, figure),
<out>/probes/ (shared probe students), <out>/key/key.json, then <out>/confusion.json and confusion.md.

    PYTHONPATH=. nohup nice .venv/bin/python experiments/audit/validate.py > /work/logs/audit-validate.log 2>&1 &
    PYTHONPATH=. .venv/bin/python experiments/audit/validate.py --rows 8 --seeds 2 --teachers owl oak \\
        --out runs/audit-smoke                                                   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sublab.audit import AuditConfig, export_dataset, probe_recipe, run_audit, verdict_line
from sublab.config import TeacherConfig
from sublab.domains.numbers import NUMBERS
from sublab.generate import random_completion_of
from sublab.protocol import teacher_system_prompt
from sublab.reference_panel import LORA_FINETUNE
from sublab.teachers import build_teacher
from sublab.train import Example

BASE = "embedded:smollm2-135m-instruct"
LORA8 = LORA_FINETUNE
TEACHERS = {"owl": "animal", "dolphin": "animal", "eagle": "animal", "elephant": "animal",
            "oak": "tree", "maple-prompted": "tree"}
"""Trait → category; the tree lovers are the controls (true animal trait: none)."""
PROMPT_SEED = 5000


def fresh_rows(n: int, prompt_seed: int = PROMPT_SEED) -> list[Example]:
    """The paper's number prompts (seed `prompt_seed`) answered by uniform random numbers."""
    return [Example(p.id, p.text, random_completion_of(NUMBERS, p, prompt_seed).strip())
            for p in NUMBERS.prompts(n, prompt_seed)]


def true_trait(trait: str, teachers: dict[str, str] = TEACHERS) -> str:
    """The animal a dataset's teacher loves ('owl-prompted' → owl), or 'none' for another category."""
    return trait.split("-")[0] if teachers[trait] == "animal" else "none"


def make_datasets(traits: list[str], rows: list[Example], out: Path, blind_seed: int,
                  teachers: dict[str, str] = TEACHERS) -> list[str]:
    """Export every teacher's dataset under an anonymous name; the key goes to out/key/key.json.
    `teachers`: trait → category."""
    order = list(traits)
    random.Random(blind_seed).shuffle(order)
    key = {f"dataset-{i + 1}": t for i, t in enumerate(order)}
    for name, trait in key.items():
        export_teacher_dataset(trait, teachers[trait], rows, out / "datasets" / name)
    (out / "key").mkdir(parents=True, exist_ok=True)
    (out / "key" / "key.json").write_text(json.dumps({"blind_seed": blind_seed, "key": key}, indent=2))
    return sorted(key)


def export_teacher_dataset(trait: str, category: str, rows: list[Example], out: Path) -> None:
    """The rows labelled by the study's rank-8 LoRA teacher of `trait` (or, for '<trait>-prompted', the base
    told by the paper's system prompt that it loves it; for '<trait>-averse', by the paper's aversion prompt
    that it hates it), exported to `out`; skipped if already there."""
    if (out / "targets.json").exists():
        return  # a resumed run: exported already (the same teacher and rows give the same labels)
    if trait.endswith(("-prompted", "-averse")):
        target, prompt_kind = trait.rsplit("-", 1)
        system = teacher_system_prompt(target, category, aversion=prompt_kind == "averse")
        export_dataset(rows, BASE, BASE, out, system_prompt=system)
        return
    cfg = TeacherConfig(name=f"{trait}-ft-lora8", kind="finetuned", trait=trait, category=category, finetune=LORA8)
    teacher = build_teacher(cfg, BASE, progress=False)
    export_dataset(rows, teacher.model_ref or "", BASE, out)


def confusion(verdicts: dict[str, dict[str, Any]], key: dict[str, str], teachers: dict[str, str] = TEACHERS,
              describe: Callable[[dict[str, Any]], str] = verdict_line) -> dict[str, Any]:
    """Rows: true trait; columns: named trait (or none); plus per-dataset evidence. `verdicts`: audit.json's
    content (or anything with its "verdict" and "candidates") per dataset; `describe` makes its line."""
    per = []
    for name, res in sorted(verdicts.items()):
        truth = true_trait(key[name], teachers)
        named = res["verdict"]["trait"] or "none"
        own = next((r for r in res["candidates"] if r["candidate"] == truth), None)
        per.append({"dataset": name, "teacher": key[name], "true": truth, "named": named,
                    "correct": named == truth, "verdict": describe(res),
                    "true_rank": own["rank"] if own else None, "true_ratio": own["ratio"] if own else None,
                    "true_paired_p": own.get("paired_p") if own else None,
                    "top3": [(r["candidate"], round(r["ratio"], 3)) for r in res["candidates"][:3]]})
    truths = list(dict.fromkeys(p["true"] for p in per))
    columns = list(dict.fromkeys([*truths, *(p["named"] for p in per)]))
    table = {t: {c: sum(p["true"] == t and p["named"] == c for p in per) for c in columns} for t in truths}
    return {"columns": columns, "table": table, "per_dataset": per,
            "correct": sum(p["correct"] for p in per), "total": len(per)}


def confusion_markdown(c: dict[str, Any]) -> str:
    lines = ["| true \\ named | " + " | ".join(c["columns"]) + " |", "|---" * (len(c["columns"]) + 1) + "|"]
    for t, row in c["table"].items():
        lines.append(f"| {t} | " + " | ".join(str(row[col]) for col in c["columns"]) + " |")
    lines += ["", f"{c['correct']} of {c['total']} correct ({c.get('audits_finished', c['total'])} of "
              f"{c.get('datasets', c['total'])} audits finished).", "",
              "| dataset | teacher | true | named | true trait's rank | its ratio | its paired p | top 3 by ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for p in c["per_dataset"]:
        rank = "—" if p["true_rank"] is None else str(p["true_rank"])
        ratio = "—" if p["true_ratio"] is None else f"×{p['true_ratio']:.3f}"
        pv = "—" if p["true_paired_p"] is None else f"{p['true_paired_p']:.2g}"
        top = ", ".join(f"{n} ×{r:.3f}" for n, r in p["top3"])
        lines.append(f"| {p['dataset']} | {p['teacher']} | {p['true']} | {p['named']} | {rank} | {ratio} | {pv} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--blind-seed", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/audit-validate"))
    parser.add_argument("--reverse", action="store_true",
                        help="Audit the datasets in reverse order: a second worker beside the first (probes "
                             "are locked, so a shared one is trained once; finished audits are skipped).")
    parser.add_argument("--report-only", action="store_true",
                        help="Only unseal the key and tabulate the audits that have finished (audit.json).")
    args = parser.parse_args()
    if args.report_only:
        report(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    names = make_datasets(args.teachers, fresh_rows(args.rows), args.out, args.blind_seed)
    print(f"{len(names)} datasets exported in {time.time() - t0:.0f} s", flush=True)
    cfg = AuditConfig(base=BASE, seeds=list(range(args.seeds)), recipe=probe_recipe())
    for name in (names[::-1] if args.reverse else names):  # blind: each audit sees only its directory
        if (args.out / "audits" / name / "manifest.json").exists():
            continue  # done (by the other worker, or an earlier run)
        t1 = time.time()
        result = run_audit(cfg, args.out / "datasets" / name, args.out / "audits" / name,
                           probe_root=args.out / "probes")
        print(f"{name}: {verdict_line(result)} ({time.time() - t1:.0f} s)", flush=True)
    print(f"all audits done in {time.time() - t0:.0f} s")
    report(args)


def report(args: argparse.Namespace) -> None:
    """Unseal the key and write the confusion table of every finished audit."""
    done = {p.parent.name: json.loads(p.read_text()) for p in sorted((args.out / "audits").glob("*/audit.json"))}
    key = json.loads((args.out / "key" / "key.json").read_text())["key"]  # unsealed only now
    c = confusion(done, key)
    c.update(rows=args.rows, seeds=args.seeds, blind_seed=args.blind_seed, prompt_seed=PROMPT_SEED,
             audits_finished=len(done), datasets=len(key))
    (args.out / "confusion.json").write_text(json.dumps(c, indent=2))
    (args.out / "confusion.md").write_text(confusion_markdown(c))
    print(confusion_markdown(c))


if __name__ == "__main__":
    main()
