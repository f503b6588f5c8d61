"""One-seed dose pilot for an experiment's recipe: for each of its teachers, one student trained step by
step on one seed's rows, its held-out animal shares printed every `--every` steps (no checkpoints, no
statistics, nothing saved — a lead for choosing a recipe, not a result).

Reads:  an experiment file (+ `--set` overrides, as `sublab`), the base model, its teachers (built through
        `sublab.teachers.build_teacher`: cached fine-tunes are reused, missing ones are built and cached
        under $SUBLAB_HOME/teachers/). The rows are those the pipeline writes for seed k with
        `generate.completions: random` (the seed's prompts, uniform random numbers), built in memory.
Writes: stdout only: one JSON line per teacher (the teacher's own shares) and per evaluation point of its
        student (step, loss, seconds, the experiment's traits' shares, the top 3 candidates). Eval
        records go to a temporary directory that is removed. Logs go to stderr.

    .venv/bin/python experiments/transfer/pilot.py experiments/transfer/lora8-shared-init.yaml --every 8 \\
        --set 'train.lr=3e-4'
    .venv/bin/python experiments/transfer/pilot.py experiments/transfer/lora8-shared-init.yaml \\
        --teachers owl-ft-lora8 dolphin-ft-lora8 --seed 1 --rows 64

The recipe is `train:` (params, loss, lr, batch_size, warmup_steps, lora_init_seed, distill…), the eval is
`eval:` with `animal_prob` on `sublab.pipeline.question_ids` (the held-out questions with
`questions: held_out`). One epoch over `--rows` rows (default `generate.n_prompts`) is
ceil(rows / batch_size / grad_accum) steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sublab.config import ExperimentConfig, load_experiment
from sublab.design import traits
from sublab.errors import ConfigError, SublabError
from sublab.evals.animals import read_prob_records, run_animal_eval, share_table
from sublab.pipeline import question_ids, resolve_device, trait_category
from sublab.teachers import build_teacher
from sublab.train.loop import prepare_run, train_step

from common import positive, seed_rows  # experiments/transfer/common.py, beside this script


def shares(lm: Any, system: str | None, cfg: ExperimentConfig, name: str) -> dict[str, float]:
    """The experiment's exact answer-probability shares (`animal_prob`, the evaluated questions), records
    in a scratch file."""
    lm.model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "animal_prob.jsonl"
        run_animal_eval(lm, system, cfg.eval, "animal_prob", question_ids(cfg), out, name, trait_category(cfg),
                        traits(cfg))
        return {c: s.mean for c, s in share_table(read_prob_records(out)).items()}


def show(sh: dict[str, float], shown: list[str]) -> dict[str, Any]:
    top = sorted(sh, key=lambda k: -sh[k])[:3]
    return {**{k: round(sh[k], 4) for k in shown}, "top": [(k, round(sh[k], 3)) for k in top]}


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def pilot(cfg: ExperimentConfig, names: list[str], seed: int, rows: int, every: int) -> None:
    device = resolve_device(cfg)
    shown = traits(cfg)
    for tcfg in (t for t in cfg.teachers if t.name in names):
        t0 = time.time()
        teacher = build_teacher(tcfg, cfg.base_model, device=device)
        if cfg.train.distills and teacher.model_ref is None:
            raise ConfigError(f"teacher '{teacher.name}' is kind '{teacher.kind.name}': it has no model to "
                              "distill from (`train.loss: distill`); leave it out with --teachers")
        row: dict[str, Any] = {"teacher": teacher.name, "build_s": round(time.time() - t0)}
        if teacher.model_ref is not None:
            lm = teacher.load(device=device)
            row.update(show(shares(lm, teacher.system_prompt, cfg, f"teacher-{teacher.name}"), shown))
            del lm
            gc.collect()
        emit(row)
        examples = seed_rows(cfg, teacher.name, seed, rows)
        run = prepare_run(cfg.train, cfg.base_model, examples, seed, teacher, device, cfg.domain)
        t0 = time.time()
        for step in range(run.total_steps):
            run.student.model.train()
            r = train_step(run, step)
            if (step + 1) % every == 0 or step + 1 == run.total_steps:
                sh = shares(run.student, None, cfg, f"student-of-{teacher.name}-seed{seed}")
                emit({"student_of": teacher.name, "seed": seed, "step": step + 1, "loss": round(r["loss"], 4),
                      "s": round(time.time() - t0), **show(sh, shown)})
        del run
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path, help="experiment YAML file (e.g. experiments/transfer/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, as `sublab --set` (repeatable)")
    ap.add_argument("--teachers", nargs="+", metavar="NAME", default=None,
                    help="only these teachers (default: every teacher of the experiment)")
    ap.add_argument("--seed", type=int, default=None,
                    help="the student seed whose rows are trained on (default: the first of train.seeds)")
    ap.add_argument("--rows", type=positive, default=None, help="rows per student (default: generate.n_prompts)")
    ap.add_argument("--every", type=positive, default=15, help="evaluate every N steps (and after the last)")
    ap.add_argument("--threads", type=positive, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core CPU one thread is often faster)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_experiment(a.experiment, a.overrides)
        known = [t.name for t in cfg.teachers]
        names = a.teachers or known
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"--teachers: {', '.join(unknown)} not in {a.experiment} (its teachers: {', '.join(known)})")
        seed = (cfg.train.seeds or [0])[0] if a.seed is None else a.seed
        if cfg.generate.per_seed_data and seed not in cfg.train.seeds:
            ap.error(f"--seed {seed}: not one of train.seeds {cfg.train.seeds}, which name the per-seed "
                     f"datasets (add --set 'train.seeds=[{seed}]')")
        pilot(cfg, names, seed, a.rows or cfg.generate.n_prompts, a.every)
    except SublabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
