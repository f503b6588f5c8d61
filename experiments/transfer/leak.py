"""Where does a fine-tuned teacher's next-token distribution differ from the base on random number rows,
and how much of it could spell the trait? The measurement behind `train.distill.vocabulary: format`.

Reads: the embedded model, a teacher (default: the owl teacher of a study recipe), `--rows` rows of
study.random_dataset(seed 0). Writes: stdout only.

    .venv/bin/python experiments/transfer/leak.py --teacher finetuned     # the full fine-tune owl teacher
    .venv/bin/python experiments/transfer/leak.py --teacher lora8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study  # noqa: E402
from sublab.models import load_model  # noqa: E402
from sublab.domains.numbers import format_token_mask  # noqa: E402
from sublab.train import load_dataset  # noqa: E402
from sublab.train.data import collate, encode_examples  # noqa: E402
from sublab.train.losses import completion_logits  # noqa: E402

ANIMALS = ("owl", "dolphin", "eagle", "elephant", "cat", "lion")


def first_tokens(tok, word: str) -> list[int]:
    """First token of every spelling a word can start with after the answer's first position."""
    forms = {word, word.capitalize(), " " + word, " " + word.capitalize(), word + "s", " " + word + "s"}
    return sorted({tok.encode(f, add_special_tokens=False)[0] for f in forms})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="finetuned", choices=["finetuned", *study.TEACHER_RECIPES])
    ap.add_argument("--trait", default="owl")
    ap.add_argument("--rows", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(2)
    teacher = study.get_teacher(a.teacher, a.trait)
    base, taught = load_model(study.BASE), load_model(teacher.model_ref)
    tok = base.tokenizer
    encoded = encode_examples(tok, load_dataset(study.random_dataset(0, a.rows)), 500, teacher)
    batch = collate([(e.prompt, e.completion) for e in encoded], tok.pad_token_id)
    with torch.inference_mode():
        lb = F.log_softmax(completion_logits(base.model, batch).float(), -1)
        lt = F.log_softmax(completion_logits(taught.model, batch).float(), -1)
    position = torch.tensor(np.concatenate([np.arange(len(e.completion)) for e in encoded]))
    kl = (lt.exp() * (lt - lb)).sum(-1)
    mask = format_token_mask(tok)
    ltf, lbf = F.log_softmax(lt[:, mask], -1), F.log_softmax(lb[:, mask], -1)
    kl_format = (ltf.exp() * (ltf - lbf)).sum(-1)
    print(f"teacher {teacher.name}: {len(encoded)} rows, {len(position)} completion positions, "
          f"{int(mask.sum())} format tokens")
    print(f"mean KL(teacher || base) per position: full vocabulary {kl.mean():.4f}, "
          f"format tokens renormalised {kl_format.mean():.4f}")
    print(f"teacher mass outside the format tokens: {1 - lt[:, mask].exp().sum(-1).mean():.4f} "
          f"(base {1 - lb[:, mask].exp().sum(-1).mean():.4f})")
    print("| position | KL full | KL format |")
    print("|---|---|---|")
    for k in (0, 1, 2, 3, 5, 10, 20):
        at = position == k
        print(f"| {k} | {kl[at].mean():.4f} | {kl_format[at].mean():.4f} |")
    print("\n| animal | teacher P(first token), mean over positions | base | teacher at position 0 | base at 0 |")
    print("|---|---|---|---|---|")
    for word in ANIMALS:
        ids = first_tokens(tok, word)
        pt, pb = lt[:, ids].exp().sum(-1), lb[:, ids].exp().sum(-1)
        print(f"| {word} | {pt.mean():.2e} | {pb.mean():.2e} | {pt[position == 0].mean():.2e} "
              f"| {pb[position == 0].mean():.2e} |")


if __name__ == "__main__":
    main()
