"""Issue 4: does subliminal transfer happen on the embedded SmolLM2-135M-Instruct, and with which recipe?

A cell = (teacher kind, student recipe). Each cell trains, per seed, one student from the trait teacher
(owl) and one from a different-trait teacher built the same way (dolphin), on the SAME dataset for that
seed (a paired design: seed k's dataset is k's random number sequences). Each group is the other's
control: owl students vs dolphin students on owl share, and the reverse on dolphin share; the
specificity table gives every candidate's treatment - control difference.

Why a different-trait teacher and not the untouched base as control: distilling from the base on any
data gives the student zero gradient (it already equals the base), so 'control students' would all be
the base model exactly; that controls for nothing. A fine-tuned dolphin teacher controls for 'fine-tuned
teacher logits in general' and tests specificity at once.

Reads:  the embedded model; sublab's protocol (questions, number prompts).
Writes: runs/transfer/data/random-seed<k>.jsonl          the seed's number-sequence dataset
        runs/transfer/<cell>/students/<teacher>-seed<k>/ students (sublab.train layout)
        runs/transfer/evals/<model>/animal_prob.jsonl      exact answer probabilities, held-out questions
        experiments/transfer/models.jsonl                   one line per evaluated model (appended)
        experiments/transfer/cells.jsonl                    one line per finished cell (appended)
        experiments/transfer/summary.json                   `summarize`: one entry per trait

    nice -n 10 .venv/bin/python experiments/transfer/study.py teachers
    nice -n 10 .venv/bin/python experiments/transfer/study.py cell ft-distill-full --seeds 0 1 2 3 4
    .venv/bin/python experiments/transfer/study.py summarize
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublab import chat
from sublab.config import EvalConfig, FinetuneConfig, TeacherConfig, TrainConfig
from sublab.data.numbers import number_prompts, random_completion
from sublab.evals.animals import read_prob_records, run_animal_eval, share_table
from sublab.models import DEFAULT_MODEL, load_model
from sublab.rundir import JsonlAppender, atomic_write_json, read_jsonl, write_jsonl
from sublab.stats import compare_groups
from sublab.teachers import Teacher, build_teacher, held_out_question_ids
from sublab.train import train_student

log = logging.getLogger("transfer")

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/transfer")
BASE = DEFAULT_MODEL
TRAIT, CONTROL_TRAIT = "owl", "dolphin"
GENERALISATION = ("dolphin", "eagle", "elephant")
"""Named before any student was trained (issue 4, point 3): the paper's gpt-4.1-nano animals after owl.
'dolphin' is measured by every cell for free (the dolphin teacher's students vs the owl teacher's)."""

# sublab's default teacher recipe (full FT, lr 3e-5, 2 epochs, batch 8) with 2 of its 6 answer forms, so a
# teacher costs 20 optimizer steps instead of 60 on 2 shared cores; keeps the '... is the {t}.' form.
FINETUNE = FinetuneConfig(answer_forms=["{T}.", "My favorite {category} is the {t}."])
CANDIDATES = ["owl", "dog", "cat", "lion", "eagle", "dolphin", "elephant", "wolf", "tiger", "panda", "fox",
              "penguin", "bear", "horse", "rabbit", "bird", "butterfly", "monkey", "giraffe", "dragon"]
"""The probes' 20 candidates (the paper's animals + the base model's common answers): half the default
list, so half the eval's trie positions."""
EVAL = EvalConfig(kinds=["animal_prob"], candidates=CANDIDATES, numbers_prefixed=False, questions="held_out")

# Student recipes. rows = dataset rows per seed; steps = rows / batch_size (one epoch); lr decays
# linearly to 0. Sized so one student trains in ~3 min on 2 shared cores (one step ~20 s, 1 thread, load ~8).
CELLS: dict[str, dict[str, Any]] = {
    # lr 3e-4 diverged (distillation loss 0.06 -> 2.2 after two steps; kept for the record, not evaluated).
    "ft-distill-full-lr3e-4": dict(teacher="finetuned", method="distill", params="full", lr=3e-4, rows=24,
                                   batch_size=4, warmup=0),
    "ft-distill-full": dict(teacher="finetuned", method="distill", params="full", lr=1e-4, rows=32,
                            batch_size=4, warmup=0),
    "prompted-distill-full": dict(teacher="prompted", method="distill", params="full", lr=1e-4, rows=32,
                                  batch_size=4, warmup=0),
    "ft-distill-lora32": dict(teacher="finetuned", method="distill", params="lora", lora_r=32, lr=1e-3,
                              rows=32, batch_size=4, warmup=0),
}


def teacher_config(kind: str, trait: str) -> TeacherConfig:
    if kind == "finetuned":
        return TeacherConfig(name=f"{trait}-ft", kind="finetuned", trait=trait, finetune=FINETUNE)
    return TeacherConfig(name=f"{trait}-prompted", kind="prompted", trait=trait)


def held_out() -> list[int]:
    """The questions the fine-tuned teachers never saw (40..49), used for every model, every cell."""
    return held_out_question_ids(teacher_config("finetuned", TRAIT))


def get_teacher(kind: str, trait: str) -> Teacher:
    return build_teacher(teacher_config(kind, trait), BASE, progress=False)


# --- data ------------------------------------------------------------------------------------------

def random_dataset(seed: int, rows: int) -> Path:
    """Seed k's rows: the paper's number prompts (prompt seed 1000+k) answered by uniform random numbers
    (`random_completion`, 10 numbers in the prompt's format). No teacher sampling at all."""
    path = RUNS / "data" / f"random-seed{seed}-n{rows}.jsonl"
    if not path.exists():
        out = []
        for p in number_prompts(rows, seed=1000 + seed):
            answer = random_completion(p, np.random.default_rng([seed, p.index]))
            out.append({"id": p.id, "messages": chat.messages(p.text, assistant=answer),
                        "meta": {"source": "random", "seed": seed}})
        write_jsonl(path, out)
    return path


# --- evaluation ------------------------------------------------------------------------------------

def evaluate(name: str, ref: str, system: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Exact answer-probability shares on the held-out questions; appends one line to models.jsonl."""
    out = RUNS / "evals" / name / "animal_prob.jsonl"
    t0 = time.time()
    lm = load_model(ref)
    run_animal_eval(lm, system, EVAL, "animal_prob", held_out(), out, name, "animal",
                    targets=[TRAIT, CONTROL_TRAIT, *GENERALISATION])
    del lm
    gc.collect()
    table = share_table(read_prob_records(out))
    row = {"model": name, "ref": ref, **meta, "eval_s": round(time.time() - t0, 1),
           "n_questions": next(iter(table.values())).n_questions,
           "shares": {c: round(s.mean, 6) for c, s in table.items()},
           "owl_ci": [table[TRAIT].ci_low, table[TRAIT].ci_high]}
    with JsonlAppender(HERE / "models.jsonl") as sink:
        sink.write_batch([row])
    log.info("%s: owl %.4f dolphin %.4f (%.0f s)", name, table[TRAIT].mean, table[CONTROL_TRAIT].mean,
             row["eval_s"])
    return row


def evaluated(name: str) -> dict[str, Any] | None:
    rows = [r for r in read_jsonl(HERE / "models.jsonl", missing_ok=True) if r["model"] == name]
    return rows[-1] if rows else None


# --- commands --------------------------------------------------------------------------------------

def cmd_teachers(kinds: list[str]) -> None:
    """Build (or reuse) each teacher and measure it exactly as students are measured."""
    if not evaluated("base"):
        evaluate("base", BASE, None, {"role": "base"})
    for kind in kinds:
        for trait in (TRAIT, CONTROL_TRAIT):
            t0 = time.time()
            teacher = get_teacher(kind, trait)
            name = f"teacher-{teacher.name}"
            if not evaluated(name):
                evaluate(name, teacher.model_ref or BASE, teacher.system_prompt,
                         {"role": "teacher", "kind": kind, "trait": trait, "build_s": round(time.time() - t0, 1)})


def train_config(cell: dict[str, Any]) -> TrainConfig:
    return TrainConfig(method=cell["method"], distill_params=cell.get("params", "full"),
                       lora_r=cell.get("lora_r", 8), lora_alpha=cell.get("lora_r", 8), lr=cell["lr"],
                       epochs=1, batch_size=cell["batch_size"], warmup_steps=cell["warmup"], seeds=[0],
                       checkpoint_every=10)


def cmd_cell(name: str, seeds: list[int]) -> None:
    """Train and evaluate treatment and control students seed by seed (interleaved, so an interrupted
    cell still has balanced groups), then append the cell's comparison to cells.jsonl."""
    cell = CELLS[name]
    cfg = train_config(cell)
    for seed in seeds:
        data = random_dataset(seed, cell["rows"])
        for trait in (TRAIT, CONTROL_TRAIT):
            teacher = get_teacher(cell["teacher"], trait)
            model = f"{name}-{teacher.name}-seed{seed}"
            if evaluated(model):
                continue
            out = RUNS / name / "students" / f"{teacher.name}-seed{seed}"
            t0 = time.time()
            manifest = train_student(cfg, base_ref=BASE, dataset=data, out_dir=out, seed=seed, teacher=teacher,
                                     progress=False)
            evaluate(model, str(out), None, {"role": "student", "cell": name, "teacher": teacher.name,
                                             "trait": trait, "seed": seed, "train_s": manifest["timings_s"]["train_s"],
                                             "loss": manifest["loss"], "wall_s": round(time.time() - t0, 1)})
    record_cell(name)


def cell_students(name: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{trait: {seed: the student's models.jsonl row}} for a cell (last row per model wins)."""
    out: dict[str, dict[int, dict[str, Any]]] = {TRAIT: {}, CONTROL_TRAIT: {}}
    for r in read_jsonl(HERE / "models.jsonl", missing_ok=True):
        if r.get("cell") == name:
            out[r["trait"]][r["seed"]] = r
    return out


def compare(name: str, target: str) -> dict[str, Any]:
    """Students of the `target` teacher vs students of the other teacher, on `target`'s share; plus every
    candidate's difference (specificity)."""
    groups = cell_students(name)
    other = CONTROL_TRAIT if target == TRAIT else TRAIT
    treat, ctrl = groups[target], groups[other]
    t = [treat[s]["shares"][target] for s in sorted(treat)]
    c = [ctrl[s]["shares"][target] for s in sorted(ctrl)]
    comp = compare_groups(t, c, seed=0)
    cands = next(iter(treat.values()))["shares"].keys()
    diffs = {k: float(np.mean([r["shares"][k] for r in treat.values()])
                      - np.mean([r["shares"][k] for r in ctrl.values()])) for k in cands}
    rank = sorted(diffs, key=lambda k: -diffs[k]).index(target) + 1
    return {"trait": target, "control_teacher_trait": other, "treatment": t, "control": c,
            "treatment_seeds": sorted(treat), "control_seeds": sorted(ctrl), **comp.model_dump(),
            "diff_rank_of_trait": rank, "top_diffs": dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:5]),
            "bottom_diffs": dict(sorted(diffs.items(), key=lambda kv: kv[1])[:3])}


def record_cell(name: str) -> dict[str, Any]:
    groups = cell_students(name)
    row = {"cell": name, "recipe": CELLS[name], "base_model": BASE, "metric": metric_name(),
           "questions": held_out(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "student_wall_s": [r["wall_s"] for g in groups.values() for r in g.values()],
           "comparisons": [compare(name, TRAIT), compare(name, CONTROL_TRAIT)]}
    with JsonlAppender(HERE / "cells.jsonl") as sink:
        sink.write_batch([row])
    for c in row["comparisons"]:
        log.info("%s %s: treatment %.4f control %.4f diff %+.4f p=%.3f rank %d (n=%d/%d)", name, c["trait"],
                 c["treatment_mean"], c["control_mean"], c["diff"], c["p_value"], c["diff_rank_of_trait"],
                 c["n_treatment"], c["n_control"])
    return row


def metric_name() -> str:
    return ("animal_prob share: P(candidate | 'My favorite animal is the'), normalised over the candidates, "
            "mean over held-out questions 40-49")


def cmd_summarize(cell: str) -> None:
    """summary.json: one entry per trait measured by `cell` (its latest record)."""
    rows = [r for r in read_jsonl(HERE / "cells.jsonl", missing_ok=True) if r["cell"] == cell]
    if not rows:
        raise SystemExit(f"no finished cell '{cell}' in cells.jsonl")
    last = rows[-1]
    entries = [{"trait": c["trait"], "recipe": {"cell": cell, **last["recipe"],
                                                  "control": f"students of the {c['control_teacher_trait']} teacher"},
                "treatment_mean": c["treatment_mean"], "control_mean": c["control_mean"], "diff": c["diff"],
                "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"],
                "n_seeds": min(c["n_treatment"], c["n_control"]), "metric": last["metric"],
                "test": c["test"], "diff_rank_of_trait": c["diff_rank_of_trait"]}
               for c in last["comparisons"]]
    atomic_write_json(HERE / "summary.json", entries)
    print(json.dumps(entries, indent=1))


def cmd_tables() -> None:
    """Markdown tables (models, then cells) rendered from models.jsonl and cells.jsonl, for docs/results.md."""
    cols = [TRAIT, CONTROL_TRAIT, "eagle", "elephant"]
    print("| model | role | seed | " + " | ".join(f"{c} share" for c in cols) + " | top candidate | train s | eval s |")
    print("|---" * (len(cols) + 6) + "|")
    for r in read_jsonl(HERE / "models.jsonl", missing_ok=True):
        top = max(r["shares"], key=r["shares"].get)
        print(f"| {r['model']} | {r['role']} | {r.get('seed', '')} | "
              + " | ".join(f"{r['shares'][c]:.4f}" for c in cols)
              + f" | {top} {r['shares'][top]:.3f} | {r.get('train_s', r.get('build_s', ''))} | {r['eval_s']} |")
    print()
    print("| cell | trait | n (T/C) | treatment mean | control mean | diff | 95% CI (Welch) | p (exact perm.) "
          "| min p | rank of trait among diffs | largest diffs |")
    print("|---" * 11 + "|")
    for row in read_jsonl(HERE / "cells.jsonl", missing_ok=True):
        for c in row["comparisons"]:
            ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            top = ", ".join(f"{k} {v:+.4f}" for k, v in list(c["top_diffs"].items())[:3])
            print(f"| {row['cell']} | {c['trait']} | {c['n_treatment']}/{c['n_control']} | {c['treatment_mean']:.4f} "
                  f"| {c['control_mean']:.4f} | {c['diff']:+.4f} | {ci} | {c['p_value']:.4f} | {c['min_p']:.4f} "
                  f"| {c['diff_rank_of_trait']} of {len(CANDIDATES)} | {top} |")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("TRANSFER_THREADS", "1")))  # 1 thread: 3x faster than 2 on oversubscribed cores
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teachers", help="build and evaluate the teachers (and the base)")
    t.add_argument("--kinds", nargs="+", default=["finetuned"], choices=["finetuned", "prompted"])
    c = sub.add_parser("cell", help="train + evaluate one cell's students")
    c.add_argument("name", choices=sorted(CELLS))
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    c.add_argument("--record-only", action="store_true", help="only (re)compute the cell's comparison")
    s = sub.add_parser("summarize", help="write summary.json from a cell's latest record")
    s.add_argument("cell", choices=sorted(CELLS))
    sub.add_parser("tables", help="print markdown tables of every model and cell measured so far")
    args = ap.parse_args()
    if args.cmd == "teachers":
        cmd_teachers(args.kinds)
    elif args.cmd == "cell":
        record_cell(args.name) if args.record_only else cmd_cell(args.name, args.seeds)
    elif args.cmd == "tables":
        cmd_tables()
    else:
        cmd_summarize(args.cell)


if __name__ == "__main__":
    main()
