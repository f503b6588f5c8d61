"""Where does a teacher's next-token distribution differ from the base on random number rows, and how much
of it could spell the trait? The measurement behind `train.distill.vocabulary: format`.

Reads:  an experiment file (+ `--set` overrides, as `sublab`), its base model and one of its teachers
        (built through `sublab.teachers.build_teacher`: a cached fine-tune is reused, a missing one is built
        and cached under $SUBLAB_HOME/teachers/), and the first `--rows` rows of the teacher's dataset for
        one seed as the pipeline writes it with `generate.completions: random` (built in memory).
Writes: stdout only: KL(teacher || base) per completion position over the full vocabulary and over the
        domain's format tokens (`Domain.token_mask`, renormalised), by position, and each animal's
        first-token probability mass. Logs go to stderr.

    .venv/bin/python experiments/transfer/leak.py experiments/transfer/lora8-shared-init.yaml \\
        --teacher owl-ft-lora8 --rows 16
    .venv/bin/python experiments/transfer/leak.py experiments/transfer/ft-distill-full.yaml

The teacher sees each row in its own context (its system prompt, if any), the base in the default one,
as distillation does. Full-vocabulary log-probabilities of every completion position are held in memory
(rows × ~40 positions × the vocabulary), hence the small default `--rows`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sublab.config import ExperimentConfig, load_experiment
from sublab.errors import ConfigError, SublabError
from sublab.models import load_model
from sublab.pipeline import resolve_device
from sublab.teachers import build_teacher
from sublab.train import collate, completion_logits, encode_examples

from common import positive, seed_rows  # experiments/transfer/common.py, beside this script

ANIMALS = ("owl", "dolphin", "eagle", "elephant", "cat", "lion")


def first_tokens(tok, word: str) -> list[int]:
    """First token of every spelling a word can start with after the answer's first position."""
    forms = {word, word.capitalize(), " " + word, " " + word.capitalize(), word + "s", " " + word + "s"}
    return sorted({tok.encode(f, add_special_tokens=False)[0] for f in forms})


def leak(cfg: ExperimentConfig, name: str, seed: int, rows: int) -> None:
    device = resolve_device(cfg)
    tcfg = next(t for t in cfg.teachers if t.name == name)
    teacher = build_teacher(tcfg, cfg.base_model, device=device)
    if teacher.model_ref is None:
        raise ConfigError(f"teacher '{name}' is kind '{teacher.kind.name}': it has no model to compare")
    base, taught = load_model(cfg.base_model, device=device), teacher.load(device=device)
    tok = base.tokenizer
    encoded = encode_examples(tok, seed_rows(cfg, name, seed, rows), cfg.train.max_seq_len, teacher)
    batch = collate([(e.prompt, e.completion) for e in encoded], tok.pad_token_id, device)
    t_batch = collate([(e.teacher_prompt or e.prompt, e.teacher_completion or e.completion) for e in encoded],
                      taught.tokenizer.pad_token_id, device)
    with torch.inference_mode():
        lb = F.log_softmax(completion_logits(base.model, batch).float(), -1).cpu()
        lt = F.log_softmax(completion_logits(taught.model, t_batch).float(), -1).cpu()
    position = torch.tensor(np.concatenate([np.arange(len(e.completion)) for e in encoded]))
    kl = (lt.exp() * (lt - lb)).sum(-1)
    mask = get_domain(cfg.domain).token_mask(tok).cpu()
    if len(mask) < lt.shape[-1]:  # an embedding matrix padded past the tokenizer: those ids are no format token
        mask = torch.cat([mask, mask.new_zeros(lt.shape[-1] - len(mask))])
    ltf, lbf = F.log_softmax(lt[:, mask], -1), F.log_softmax(lb[:, mask], -1)
    kl_format = (ltf.exp() * (ltf - lbf)).sum(-1)
    print(f"teacher {teacher.name} (seed {seed} rows of {cfg.name}): {len(encoded)} rows, "
          f"{len(position)} completion positions, {int(mask.sum())} format tokens ({cfg.domain})")
    print(f"mean KL(teacher || base) per position: full vocabulary {kl.mean():.4f}, "
          f"format tokens renormalised {kl_format.mean():.4f}")
    print(f"teacher mass outside the format tokens: {1 - lt[:, mask].exp().sum(-1).mean():.4f} "
          f"(base {1 - lb[:, mask].exp().sum(-1).mean():.4f})")
    print("| position | KL full | KL format |")
    print("|---|---|---|")
    for k in (0, 1, 2, 3, 5, 10, 20):
        at = position == k
        if at.any():
            print(f"| {k} | {kl[at].mean():.4f} | {kl_format[at].mean():.4f} |")
    print("\n| animal | teacher P(first token), mean over positions | base | teacher at position 0 | base at 0 |")
    print("|---|---|---|---|---|")
    for word in ANIMALS:
        ids = first_tokens(tok, word)
        pt, pb = lt[:, ids].exp().sum(-1), lb[:, ids].exp().sum(-1)
        print(f"| {word} | {pt.mean():.2e} | {pb.mean():.2e} | {pt[position == 0].mean():.2e} "
              f"| {pb[position == 0].mean():.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path, help="experiment YAML file (e.g. experiments/transfer/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, as `sublab --set` (repeatable)")
    ap.add_argument("--teacher", default=None, metavar="NAME",
                    help="the teacher to compare with the base (default: the experiment's first trait teacher)")
    ap.add_argument("--seed", type=int, default=None,
                    help="the student seed whose rows are used (default: the first of train.seeds)")
    ap.add_argument("--rows", type=positive, default=16,
                    help="rows, the first of the seed's dataset (overrides generate.n_prompts; default 16)")
    ap.add_argument("--threads", type=positive, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core CPU one thread is often faster)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_experiment(a.experiment, a.overrides)
        known = [t.name for t in cfg.teachers]
        name = a.teacher or next((t.name for t in cfg.teachers if t.trait and not t.is_control), known[0])
        if name not in known:
            ap.error(f"--teacher {name}: not in {a.experiment} (its teachers: {', '.join(known)})")
        seed = (cfg.train.seeds or [0])[0] if a.seed is None else a.seed
        if cfg.generate.per_seed_data and seed not in cfg.train.seeds:
            ap.error(f"--seed {seed}: not one of train.seeds {cfg.train.seeds}, which name the per-seed "
                     f"datasets (add --set 'train.seeds=[{seed}]')")
        leak(cfg, name, seed, a.rows)
    except SublabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
