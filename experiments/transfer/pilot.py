"""One-seed dose pilot for a cell recipe: owl and dolphin teachers, one student each on the same random
number rows, held-out shares printed every `--every` steps (no checkpoints, no statistics — a lead for
choosing a recipe, not a result).

Reads: the embedded model, the teachers (built or reused through `study.get_teacher` / `build_teacher`).
Writes: stdout only, one JSON line per teacher and per evaluation point.

    .venv/bin/python experiments/transfer/pilot.py --lr 1e-4 --steps 60                     # full FT teachers
    .venv/bin/python experiments/transfer/pilot.py --teacher lora8 --params lora --r 8 \\
        --init-seed 0 --lr 1e-3 --steps 40 --every 10                                     # LoRA, shared init
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study  # noqa: E402
from sublab.config import DistillConfig, TrainConfig  # noqa: E402
from sublab.evals.animals import read_prob_records, run_animal_eval, share_table  # noqa: E402
from sublab.models import load_model  # noqa: E402
from sublab.rundir import sha256_file  # noqa: E402
from sublab.train import load_dataset  # noqa: E402
from sublab.train.loop import prepare_run, train_step  # noqa: E402

SHOWN = ("owl", "dolphin", "eagle", "elephant")


def shares(lm, name: str) -> dict[str, float]:
    """study.EVAL's metric (the study's own eval code, records in a scratch file): held-out shares."""
    lm.model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "animal_prob.jsonl"
        run_animal_eval(lm, None, study.EVAL, "animal_prob", study.held_out(), out, name, "animal",
                        targets=list(SHOWN))
        return {c: s.mean for c, s in share_table(read_prob_records(out)).items()}


def show(sh: dict[str, float]) -> dict:
    top = sorted(sh, key=lambda k: -sh[k])[:3]
    return {**{k: round(sh[k], 4) for k in SHOWN}, "top": [(k, round(sh[k], 3)) for k in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="finetuned", choices=["finetuned", *study.TEACHER_RECIPES])
    ap.add_argument("--params", default="full", choices=["full", "lora"])
    ap.add_argument("--r", type=int, default=8, help="student LoRA rank")
    ap.add_argument("--init-seed", type=int, default=None, help="student LoRA init seed (teacher's: shared init)")
    ap.add_argument("--vocab", default="format", choices=["full", "format"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--every", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--traits", nargs="+", default=["owl", "dolphin"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = study.random_dataset(a.seed, a.steps * a.batch)
    rows, sha = load_dataset(data), sha256_file(data)
    cfg = TrainConfig(method="distill", distill_params=a.params, lora_r=a.r, lora_alpha=a.r, lora_init_seed=a.init_seed,
                      lr=a.lr, epochs=1, batch_size=a.batch, warmup_steps=a.warmup,
                      distill=DistillConfig(vocabulary=a.vocab))
    for trait in a.traits:
        t0 = time.time()
        teacher = study.get_teacher(a.teacher, trait)
        taught = shares(load_model(teacher.model_ref or study.BASE), teacher.name)
        print(json.dumps({"teacher": teacher.name, "build_s": round(time.time() - t0), **show(taught)}), flush=True)
        run = prepare_run(cfg, study.BASE, rows, sha, a.seed, teacher, None, "cpu")
        t0 = time.time()
        for step in range(run.total_steps):
            run.student.model.train()
            r = train_step(run, step)
            if (step + 1) % a.every == 0 or step + 1 == run.total_steps:
                print(json.dumps({"student_of": teacher.name, "step": step + 1, "loss": round(r["loss"], 4),
                                  "s": round(time.time() - t0),
                                  **show(shares(run.student, f"student-of-{teacher.name}"))}), flush=True)


if __name__ == "__main__":
    main()
