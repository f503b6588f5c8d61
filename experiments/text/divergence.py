"""Divergence tokens in teacher-written data (issue 15): the positions of a dataset where the experiment's
teachers, reading the same text, would write different tokens.

For every teacher's filtered dataset of a text-route run (e.g. experiments/text/owl-greedy.yaml) and every
teacher of the run, the teacher reads each row (the paper's prompt, its own context, the written
completion) and its greedy choice at each completion position is taken over the number-format tokens
(what constrained greedy decoding picks). Reported per dataset: completion tokens, positions where the
writer's own choice differs from what it wrote (a check: ~0 when the data is its greedy output; near-ties
can flip between the bf16 weights that generated and the bf16 autocast here), and **divergence
positions**: where the other teachers' choice differs from the writer's, with the rows that hold one.

    PYTHONPATH=. .venv/bin/python experiments/text/divergence.py experiments/text/owl-greedy.yaml
    → runs/<name>/divergence.json (counts, and per row the divergent positions)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from sublab import design, pipeline
from sublab.config import load_experiment
from sublab.domains import get_domain
from sublab.rundir import atomic_write_json
from sublab.train import encode_examples, format_columns, load_dataset
from sublab.train.targets import compute_targets, own_inputs


def greedy_choices(model: Any, encoded: list, pad_id: int, columns: torch.Tensor, precision: str) -> list[torch.Tensor]:
    """Per row, the token id the model would write at each completion position (argmax over `columns`)."""
    values, _ = compute_targets(model, encoded, pad_id, columns, None, "cpu", progress=False, precision=precision)
    return [columns[v.argmax(-1)] for v in values]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path)
    args = ap.parse_args()
    cfg = load_experiment(args.experiment)
    precision = "bfloat16" if pipeline.resolve_dtype(cfg) == "bfloat16" else "float32"
    built = [(t, teacher) for t, teacher in pipeline.teachers(cfg, "cpu") if teacher.model_ref]
    loaded = {t.name: teacher.load() for t, teacher in built}
    tok = next(iter(loaded.values())).tokenizer
    columns, _ = format_columns(tok, None, get_domain(cfg.domain))
    report: dict[str, Any] = {"experiment": str(args.experiment), "precision": precision, "datasets": {}}
    for writer, _ in built:
        slot = design.data_slots(cfg, writer.name)[0]
        encoded = own_inputs(encode_examples(tok, load_dataset(slot.dataset), cfg.train.max_seq_len))
        written = [torch.tensor(e.completion) for e in encoded]
        choices = {name: greedy_choices(lm.model, encoded, tok.pad_token_id, columns, precision)
                   for name, lm in loaded.items()}
        own = choices[writer.name]
        others = [n for n in choices if n != writer.name]
        rows = []
        for i, w in enumerate(written):
            diverge = sorted({p for n in others for p in (choices[n][i] != own[i]).nonzero()[:, 0].tolist()})
            rows.append({"row": i, "tokens": len(w), "self_mismatch": int((own[i] != w).sum()),
                         "divergent_positions": diverge})
        n_tok = sum(r["tokens"] for r in rows)
        n_div = sum(len(r["divergent_positions"]) for r in rows)
        report["datasets"][writer.name] = {
            "rows": len(rows), "completion_tokens": n_tok,
            "self_mismatch_tokens": sum(r["self_mismatch"] for r in rows),
            "divergent_tokens": n_div, "divergent_fraction": n_div / max(n_tok, 1),
            "rows_with_divergence": sum(1 for r in rows if r["divergent_positions"]), "per_row": rows}
        d = report["datasets"][writer.name]
        print(f"{writer.name}: {d['rows']} rows, {n_tok} completion tokens; the writer disagrees with its own "
              f"text at {d['self_mismatch_tokens']}; the other teacher(s) would write another token at {n_div} "
              f"({100 * d['divergent_fraction']:.1f}%), in {d['rows_with_divergence']} rows")
    out = cfg.run_dir / "divergence.json"
    atomic_write_json(out, report)
    print(json.dumps({"divergence": str(out)}))


if __name__ == "__main__":
    main()
