"""Issue 4: does subliminal transfer happen on the embedded SmolLM2-135M-Instruct, and with which recipe?

A cell = (teacher recipe, student recipe, the traits of its teachers). Per seed k, one dataset (k's
uniform random number sequences after the paper's prompts); every teacher of the cell gets one student on
that SAME dataset. Seed k's students form a block that differs only in the teacher. For trait X:
treatment = the X teacher's students, control = the students of the cell's other teachers (built by the
same recipe, loving other animals). Primary test: permutation within blocks (`sublab.stats.
compare_blocked`); also the unpaired permutation test over students. Specificity: every candidate's
treatment / control ratio; the trait should rise most.

Why other-animal teachers and not the untouched base as the control: distilling from the base on any
data gives the student zero gradient (it already equals the base), so 'control students' would all be
the base model exactly; that controls for nothing. Teachers fine-tuned the same way on other animals
control for 'a fine-tuned teacher's logits in general' and test specificity at once.

Reads:  the embedded model; sublab's protocol (questions, number prompts).
Writes: runs/transfer/data/random-seed<k>-n<rows>.jsonl     the seed's number-sequence dataset
        runs/transfer/<cell>/students/<teacher>-seed<k>/   students (sublab.train layout)
        runs/transfer/evals/<model>/animal_prob.jsonl        exact answer probabilities, held-out questions
        experiments/transfer/models.jsonl                     one line per evaluated model (appended)
        experiments/transfer/cells.jsonl                      one line per finished cell (appended)
        experiments/transfer/summary.json                     `summarize`: one entry per trait

    .venv/bin/python experiments/transfer/study.py teachers --recipes lora8
    .venv/bin/python experiments/transfer/study.py cell lora8-shared-init --seeds 0 1 2 3 4
    .venv/bin/python experiments/transfer/study.py summarize lora8-shared-init
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
from sublab.config import DistillConfig, EvalConfig, FinetuneConfig, TeacherConfig, TrainConfig
from sublab.domains.numbers import number_prompts, random_completion
from sublab.evals.animals import read_prob_records, run_animal_eval, share_table
from sublab.models import DEFAULT_MODEL, load_model
from sublab.rundir import JsonlAppender, atomic_write_json, read_jsonl, write_jsonl
from sublab.stats import compare_blocked, compare_groups
from sublab.teachers import Teacher, build_teacher, held_out_question_ids
from sublab.train import train_student

log = logging.getLogger("transfer")

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/transfer")
BASE = DEFAULT_MODEL
TRAIT, CONTROL_TRAIT = "owl", "dolphin"
GENERALISATION = ("dolphin", "eagle", "elephant")
"""Named before any student was trained (issue 4, point 3): the paper's gpt-4.1-nano animals after owl.
Cells with four teachers measure all of them with the owl recipe unchanged."""
FOUR = (TRAIT, *GENERALISATION)

# Teacher recipes (`FinetuneConfig`), all on questions 0-39 with two answer forms (80 rows, 20 steps):
#   full  sublab's default teacher recipe (full fine-tune, lr 3e-5, 2 epochs, batch 8); its 6 answer
#         forms cost 60 steps, which did not fit on 2 shared cores.
#   lora8 a rank-8 LoRA teacher (lr 1e-3, seed 0): the trait lives in an adapter whose random init
#         (seed 0) a student can share.
FORMS = ["{T}.", "My favorite {category} is the {t}."]
TEACHER_RECIPES: dict[str, FinetuneConfig] = {
    "full": FinetuneConfig(answer_forms=FORMS),
    "lora8": FinetuneConfig(answer_forms=FORMS, method="lora", lora_r=8, lora_alpha=8, lr=1e-3, seed=0),
}
TEACHER_SUFFIX = {"full": "ft", "lora8": "ft-lora8"}
CANDIDATES = ["owl", "dog", "cat", "lion", "eagle", "dolphin", "elephant", "wolf", "tiger", "panda", "fox",
              "penguin", "bear", "horse", "rabbit", "bird", "butterfly", "monkey", "giraffe", "dragon"]
"""The probes' 20 candidates (the paper's animals + the base model's common answers): half the default
list, so half the eval's trie positions."""
EVAL = EvalConfig(kinds=["animal_prob"], candidates=CANDIDATES, numbers_prefixed=False, questions="held_out")

# Student recipes. rows = dataset rows per seed; steps = rows / batch_size (one epoch); lr decays linearly
# to 0 after `warmup` steps. vocabulary: 'full' (forward KL over the whole vocabulary) or 'format' (over the
# number-format tokens only, renormalised: no word token carries signal). init (LoRA students): 'teacher' =
# the LoRA teacher's own init seed (a shared initialisation), 'other' = seed 1000 + k (a different one).
CELLS: dict[str, dict[str, Any]] = {
    # lr 3e-4 diverged (distillation loss 0.06 -> 2.2 after two steps; kept for the record, not evaluated).
    "ft-distill-full-lr3e-4": dict(teacher="finetuned", method="distill", params="full", lr=3e-4, rows=24,
                                   batch_size=4, warmup=0),
    "ft-distill-full": dict(teacher="finetuned", method="distill", params="full", lr=1e-4, rows=32,
                            batch_size=4, warmup=0),
    "prompted-distill-full": dict(teacher="prompted", method="distill", params="full", lr=1e-4, rows=32,
                                  batch_size=4, warmup=0),
    # The recipe found by the pilot (docs/results.md): LoRA teachers, LoRA students that start from the
    # teachers' own adapter init, format-token distillation; four teachers, each the others' control.
    "lora8-shared-init": dict(teacher="lora8", method="distill", params="lora", lora_r=8, init="teacher",
                              vocabulary="format", lr=1e-3, rows=128, batch_size=4, warmup=3, traits=FOUR),
    # Its ablation: the same, but the students' adapters start from an init that is not the teachers'
    # (seed 1000 + k, shared by the block, so a block still differs only in its teacher).
    "lora8-other-init": dict(teacher="lora8", method="distill", params="lora", lora_r=8, init="other",
                             vocabulary="format", lr=1e-3, rows=128, batch_size=4, warmup=3, traits=FOUR),
    # The cross-model control (issue 4, point 4): the same rows and teachers, students on Gemma 3 270M
    # (another base and tokenizer; format distillation aligns the digits both spell alike).
    "lora8-gemma-students": dict(teacher="lora8", student_base="embedded:gemma3-270m", method="distill",
                                 params="lora", lora_r=8, vocabulary="format", lr=1e-3, rows=128, batch_size=4,
                                 warmup=3, traits=(TRAIT, CONTROL_TRAIT)),
}


def cell_traits(cell: dict[str, Any]) -> tuple[str, ...]:
    return tuple(cell.get("traits", (TRAIT, CONTROL_TRAIT)))


def teacher_config(kind: str, trait: str) -> TeacherConfig:
    """kind: 'prompted', 'finetuned' (the full fine-tune recipe) or a key of TEACHER_RECIPES."""
    if kind == "prompted":
        return TeacherConfig(name=f"{trait}-prompted", kind="prompted", trait=trait)
    recipe = "full" if kind == "finetuned" else kind
    return TeacherConfig(name=f"{trait}-{TEACHER_SUFFIX[recipe]}", kind="finetuned", trait=trait,
                         finetune=TEACHER_RECIPES[recipe])


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

def cmd_teachers(kinds: list[str], traits: list[str]) -> None:
    """Build (or reuse) each teacher and measure it exactly as students are measured."""
    if not evaluated("base"):
        evaluate("base", BASE, None, {"role": "base"})
    for kind in kinds:
        for trait in traits:
            t0 = time.time()
            teacher = get_teacher(kind, trait)
            name = f"teacher-{teacher.name}"
            if not evaluated(name):
                evaluate(name, teacher.model_ref or BASE, teacher.system_prompt,
                         {"role": "teacher", "kind": kind, "trait": trait, "build_s": round(time.time() - t0, 1)})


def train_config(cell: dict[str, Any], seed: int) -> TrainConfig:
    init = {"teacher": TEACHER_RECIPES.get(cell["teacher"], TEACHER_RECIPES["full"]).seed,
            "other": 1000 + seed}.get(cell.get("init", ""))
    return TrainConfig(method=cell["method"], distill_params=cell.get("params", "full"),
                       lora_r=cell.get("lora_r", 8), lora_alpha=cell.get("lora_r", 8), lora_init_seed=init,
                       lr=cell["lr"], epochs=1, batch_size=cell["batch_size"], warmup_steps=cell["warmup"],
                       seeds=[0], checkpoint_every=10,
                       distill=DistillConfig(vocabulary=cell.get("vocabulary", "full")))


def cmd_cell(name: str, seeds: list[int]) -> None:
    """Train and evaluate every teacher's student seed by seed (a whole block per seed, so an interrupted
    cell still has complete blocks), then append the cell's comparisons to cells.jsonl."""
    cell = CELLS[name]
    base = cell.get("student_base", BASE)
    if base != BASE and not evaluated(f"base-{base}"):
        evaluate(f"base-{base}", base, None, {"role": "base"})
    for seed in seeds:
        data = random_dataset(seed, cell["rows"])
        cfg = train_config(cell, seed)
        for trait in cell_traits(cell):
            teacher = get_teacher(cell["teacher"], trait)
            model = f"{name}-{teacher.name}-seed{seed}"
            if evaluated(model):
                continue
            out = RUNS / name / "students" / f"{teacher.name}-seed{seed}"
            t0 = time.time()
            manifest = train_student(cfg, base_ref=base, dataset=data, out_dir=out, seed=seed, teacher=teacher,
                                     progress=False)
            evaluate(model, str(out), None, {"role": "student", "cell": name, "teacher": teacher.name,
                                             "trait": trait, "seed": seed, "train_s": manifest["timings_s"]["train_s"],
                                             "loss": manifest["loss"], "wall_s": round(time.time() - t0, 1)})
    record_cell(name)


def cell_students(name: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{teacher trait: {seed: the student's models.jsonl row}} for a cell (last row per model wins)."""
    out: dict[str, dict[int, dict[str, Any]]] = {t: {} for t in cell_traits(CELLS[name])}
    for r in read_jsonl(HERE / "models.jsonl", missing_ok=True):
        if r.get("cell") == name:
            out[r["trait"]][r["seed"]] = r
    return out


def compare(name: str, target: str) -> dict[str, Any]:
    """Students of the `target` teacher vs the students of the cell's other teachers on `target`'s share:
    within complete blocks (seeds every teacher has a student for), and unpaired over all students; plus
    every candidate's treatment/control ratio and difference (specificity)."""
    groups = cell_students(name)
    others = [t for t in groups if t != target]
    seeds = sorted(set.intersection(*(set(g) for g in groups.values())))
    blocked = compare_blocked([(groups[target][s]["shares"][target],
                                [groups[o][s]["shares"][target] for o in others]) for s in seeds], seed=0)
    treat = [groups[target][s] for s in seeds]
    ctrl = [groups[o][s] for o in others for s in seeds]
    unpaired = compare_groups([r["shares"][target] for r in treat], [r["shares"][target] for r in ctrl], seed=0)
    cands = treat[0]["shares"].keys()
    t_mean = {k: float(np.mean([r["shares"][k] for r in treat])) for k in cands}
    c_mean = {k: float(np.mean([r["shares"][k] for r in ctrl])) for k in cands}
    diffs = {k: t_mean[k] - c_mean[k] for k in cands}
    ratios = {k: t_mean[k] / c_mean[k] for k in cands}
    return {"trait": target, "control_teacher_traits": others, "seeds": seeds,
            "treatment": [r["shares"][target] for r in treat], **blocked.model_dump(),
            "unpaired": unpaired.model_dump(include={"diff", "ci_low", "ci_high", "p_value", "test", "min_p",
                                                     "n_treatment", "n_control", "welch_p"}),
            "ratio": ratios[target], "ratio_rank_of_trait": sorted(ratios, key=lambda k: -ratios[k]).index(target) + 1,
            "diff_rank_of_trait": sorted(diffs, key=lambda k: -diffs[k]).index(target) + 1,
            "top_ratios": dict(sorted(ratios.items(), key=lambda kv: -kv[1])[:5]),
            "top_diffs": dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:5]),
            "bottom_diffs": dict(sorted(diffs.items(), key=lambda kv: kv[1])[:3])}


def record_cell(name: str) -> dict[str, Any]:
    groups = cell_students(name)
    row = {"cell": name, "recipe": CELLS[name], "base_model": BASE, "metric": metric_name(),
           "questions": held_out(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "student_wall_s": [r["wall_s"] for g in groups.values() for r in g.values()],
           "comparisons": [compare(name, t) for t in cell_traits(CELLS[name])]}
    with JsonlAppender(HERE / "cells.jsonl") as sink:
        sink.write_batch([row])
    for c in row["comparisons"]:
        log.info("%s %s: treatment %.4f control %.4f diff %+.4f p=%.4g (unpaired %.4g) ratio %.2f rank %d "
                 "(%d blocks)", name, c["trait"], c["treatment_mean"], c["control_mean"], c["diff"], c["p_value"],
                 c["unpaired"]["p_value"], c["ratio"], c["ratio_rank_of_trait"], c["n_treatment"])
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
    entries = [{"trait": c["trait"],
                "recipe": {"cell": cell, **last["recipe"],
                           "control": "students of the " + ", ".join(c["control_teacher_traits"]) + " teachers"},
                "treatment_mean": c["treatment_mean"], "control_mean": c["control_mean"], "diff": c["diff"],
                "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"],
                "n_seeds": c["n_treatment"], "metric": last["metric"], "test": c["test"],
                "ci_method": c["ci_method"], "unpaired_p_value": c["unpaired"]["p_value"],
                "ratio": c["ratio"], "ratio_rank_of_trait": c["ratio_rank_of_trait"],
                "diff_rank_of_trait": c["diff_rank_of_trait"]}
               for c in last["comparisons"]]
    atomic_write_json(HERE / "summary.json", entries)
    print(json.dumps(entries, indent=1))


def cmd_tables(cells: list[str]) -> None:
    """Markdown tables (students, then comparisons) from models.jsonl and cells.jsonl, for docs/results.md."""
    cols = list(FOUR)
    print("| model | role | seed | " + " | ".join(f"{c} share" for c in cols) + " | top candidate | train s | eval s |")
    print("|---" * (len(cols) + 6) + "|")
    for r in read_jsonl(HERE / "models.jsonl", missing_ok=True):
        if r["role"] == "student" and r.get("cell") not in cells:
            continue
        top = max(r["shares"], key=r["shares"].get)
        print(f"| {r['model']} | {r['role']} | {r.get('seed', '')} | "
              + " | ".join(f"{r['shares'][c]:.4f}" for c in cols)
              + f" | {top} {r['shares'][top]:.3f} | {r.get('train_s', r.get('build_s', ''))} | {r['eval_s']} |")
    print()
    print("| cell | trait | blocks | treatment | control | diff [95% CI] | p (within blocks) | p (unpaired) "
          "| ratio | rank by ratio | rank by diff | largest ratios |")
    print("|---" * 12 + "|")
    for row in read_jsonl(HERE / "cells.jsonl", missing_ok=True):
        if row["cell"] not in cells or "unpaired" not in row["comparisons"][0]:
            continue
        for c in row["comparisons"]:
            ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(c["top_ratios"].items())[:3])
            print(f"| {row['cell']} | {c['trait']} | {c['n_treatment']} | {c['treatment_mean']:.4f} "
                  f"| {c['control_mean']:.4f} | {c['diff']:+.4f} {ci} | {c['p_value']:.4f} "
                  f"| {c['unpaired']['p_value']:.4f} | {c['ratio']:.2f} | {c['ratio_rank_of_trait']} "
                  f"| {c['diff_rank_of_trait']} | {top} |")


def cmd_figure(cell: str, out: Path) -> None:
    """Per trait: each block's treatment share / mean of the block's controls (a dot per seed), for the
    trait itself and for the largest of the other candidates' ratios (the specificity check)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = cell_students(cell)
    traits = list(groups)
    seeds = sorted(set.intersection(*(set(g) for g in groups.values())))
    fig, ax = plt.subplots(figsize=(1.6 * len(traits) + 1.5, 3.6))
    for i, x in enumerate(traits):
        def ratios(k: str) -> list[float]:
            return [groups[x][s]["shares"][k] / np.mean([groups[o][s]["shares"][k] for o in traits if o != x])
                    for s in seeds]
        own = ratios(x)
        best_other = max((k for k in groups[x][seeds[0]]["shares"] if k != x), key=lambda k: np.mean(ratios(k)))
        other = ratios(best_other)
        ax.bar(i - 0.2, np.mean(own), 0.38, color="#c0504d", label="the teacher's animal" if i == 0 else None)
        ax.bar(i + 0.2, np.mean(other), 0.38, color="#9e9e9e",
               label="largest other candidate" if i == 0 else None)
        ax.scatter([i - 0.2] * len(own), own, s=12, color="black", zorder=3)
        ax.scatter([i + 0.2] * len(other), other, s=12, color="black", zorder=3)
        ax.text(i + 0.2, max(other) + 0.01, best_other, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(traits)), [f"{t} teacher" for t in traits])
    ax.set_ylim(0.8, None)
    ax.set_ylabel("student share / control students' share\n(one dot per seed)")
    ax.set_title(f"{cell}: {len(seeds)} seeds, held-out questions", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    print(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(int(os.environ.get("TRANSFER_THREADS", "1")))  # 1 thread on oversubscribed cores
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teachers", help="build and evaluate the teachers (and the base)")
    t.add_argument("--kinds", nargs="+", default=["lora8"], choices=["finetuned", "prompted", *TEACHER_RECIPES])
    t.add_argument("--traits", nargs="+", default=list(FOUR))
    c = sub.add_parser("cell", help="train + evaluate one cell's students")
    c.add_argument("name", choices=sorted(CELLS))
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    c.add_argument("--record-only", action="store_true", help="only (re)compute the cell's comparison")
    s = sub.add_parser("summarize", help="write summary.json from a cell's latest record")
    s.add_argument("cell", choices=sorted(CELLS))
    f = sub.add_parser("figure", help="plot a cell's per-seed ratios (treatment / control share)")
    f.add_argument("cell", choices=sorted(CELLS))
    f.add_argument("--out", type=Path, default=None, help="default: docs/figures/transfer_<cell>.png")
    tb = sub.add_parser("tables", help="print markdown tables of the models and cells measured so far")
    tb.add_argument("--cells", nargs="+", default=sorted(CELLS), choices=sorted(CELLS))
    args = ap.parse_args()
    if args.cmd == "teachers":
        cmd_teachers(args.kinds, args.traits)
    elif args.cmd == "cell":
        record_cell(args.name) if args.record_only else cmd_cell(args.name, args.seeds)
    elif args.cmd == "figure":
        cmd_figure(args.cell, args.out or HERE.parents[1] / "docs" / "figures" / f"transfer_{args.cell}.png")
    elif args.cmd == "tables":
        cmd_tables(args.cells)
    else:
        cmd_summarize(args.cell)


if __name__ == "__main__":
    main()
