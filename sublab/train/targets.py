"""A teacher's distillation targets for a row set, computed once and shared by every student that needs them.

Format distillation (`distill.vocabulary: format`) and top-k distillation need only a few dozen numbers per
completion position from the teacher, and those numbers are the same for every student of that teacher on
those rows — every seed, every cell of a grid that varies the student's recipe. So the first student
computes them (one teacher forward per row: fp32, or under bf16 autocast with `train.distill.
targets_precision: bfloat16`) and stores them; the rest read them:

    $SUBLAB_HOME/targets/<key>/targets.safetensors   "values" (P, k) float32 log-probabilities over the
                                                       format columns (or the top-k), "ids" (P, k) for
                                                       top-k, "offsets" (rows + 1): row r owns
                                                       values[offsets[r]:offsets[r + 1]]
    $SUBLAB_HOME/targets/<key>/manifest.json          written last: the key's parts, the file's sha256

The key hashes what decides the numbers: the teacher's weights, the exact token ids the teacher reads (its
context and every completion, after `max_seq_len`), the columns or k, and the forward's precision. Reuse checks the file's
sha256 and its shape against the rows; a damaged entry is rebuilt. Building holds the entry's lock, so two
workers asking at once compute it once. Full-vocabulary distillation (49k floats per position) stays live.

Reading targets instead of running the teacher beside the student changes only float rounding (the teacher
sees its rows in other batches); a student's fingerprint does not depend on where its targets came from.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sublab.models import sublab_home
from sublab.rundir import cache_entry_lock, fingerprint, read_json, stage_is_current, write_manifest
from sublab.train.data import Encoded, collate
from sublab.train.losses import teacher_targets

log = logging.getLogger(__name__)

FILE = "targets.safetensors"
BATCH_ROWS = 8
"""Rows per teacher forward while computing targets (length-sorted, so little padding)."""


def cache_root() -> Path:
    """Where target entries live (tests point this at a temporary directory)."""
    return sublab_home() / "targets"


@dataclass(frozen=True)
class StoredTargets:
    """Per-row teacher targets, as `teacher_targets` returns them for one row: values (n, k) and ids (n, k)
    or None. `source` says where they came from, for logs and manifests."""

    values: list[torch.Tensor]
    ids: list[torch.Tensor] | None
    key: str
    sha256: str
    source: str
    """'computed' or 'reused'."""
    weights: list[torch.Tensor] | None = None
    """Per row, (n,) loss weights of its positions (0: dropped by a defence, `sublab.train.defences`);
    None: every position counts once."""

    def rows(self, indices: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stacked targets of these rows, in order: what a live teacher forward over them returns."""
        values = torch.cat([self.values[i] for i in indices]).to(device)
        ids = torch.cat([self.ids[i] for i in indices]).to(device) if self.ids is not None else None
        return values, ids

    def row_weights(self, indices: list[int], device: str) -> torch.Tensor | None:
        """The stacked loss weights of these rows' positions, or None when every position counts."""
        return torch.cat([self.weights[i] for i in indices]).to(device) if self.weights is not None else None


def teacher_inputs(encoded: list[Encoded]) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) token ids as the teacher reads each row."""
    return [(e.teacher_prompt or [], e.teacher_completion or e.completion) for e in encoded]


def own_inputs(encoded: list[Encoded]) -> list[Encoded]:
    """The rows as the student's own model reads them (its prompt, no teacher context): to compute the base's
    or a student's targets with the functions here."""
    return [replace(e, teacher_prompt=e.prompt, teacher_completion=None, aligned=None) for e in encoded]


def targets_key(teacher_sha256: str, encoded: list[Encoded], columns: torch.Tensor | None,
                top_k: int | None, precision: str = "float32") -> str:
    """Everything that decides the stored numbers (stored as float32 whatever the forward's precision)."""
    return fingerprint({"teacher": teacher_sha256, "inputs": fingerprint(teacher_inputs(encoded)),
                        "columns": None if columns is None else columns.tolist(), "top_k": top_k,
                        "dtype": precision})


def compute_targets(teacher_model: Any, encoded: list[Encoded], pad_id: int, columns: torch.Tensor | None,
                    top_k: int | None, device: str, progress: bool = True, precision: str = "float32"
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The teacher's targets per row (on the CPU, float32), batched by length; `precision` bfloat16: the
    forward under bf16 autocast."""
    pairs = teacher_inputs(encoded)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    values: list[torch.Tensor | None] = [None] * len(pairs)
    ids: list[torch.Tensor | None] = [None] * len(pairs)
    bar = tqdm(total=len(order), desc="teacher targets", unit="row", disable=not progress)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        for start in range(0, len(order), BATCH_ROWS):
            chunk = order[start:start + BATCH_ROWS]
            batch = collate([pairs[i] for i in chunk], pad_id, device)
            lp, top = teacher_targets(teacher_model, batch, top_k, columns)
            sizes = [len(pairs[i][1]) for i in chunk]
            for i, v in zip(chunk, lp.float().cpu().split(sizes)):
                values[i] = v.contiguous()
            if top is not None:
                for i, t in zip(chunk, top.cpu().split(sizes)):
                    ids[i] = t.to(torch.int32).contiguous()
            bar.update(len(chunk))
    bar.close()
    return [v for v in values if v is not None], (None if top_k is None else [t for t in ids if t is not None])


def load_or_compute(teacher_model: Any, teacher_sha256: str, encoded: list[Encoded], pad_id: int,
                    columns: torch.Tensor | None, top_k: int | None, device: str, teacher_name: str,
                    progress: bool = True, precision: str = "float32") -> StoredTargets:
    """The teacher's targets for these rows: read from the cache when an intact entry exists, else
    computed now and stored (atomically, under the entry's lock)."""
    from safetensors.torch import load_file, save_file

    key = targets_key(teacher_sha256, encoded, columns, top_k, precision)
    root = cache_root() / key
    with cache_entry_lock(root):
        if stage_is_current(root, key) and _fits(root, encoded):
            tensors = load_file(str(root / FILE))
            values, ids = _split(tensors, len(encoded))
            log.info("teacher '%s': reusing its targets for %d rows (%s)", teacher_name, len(encoded), root)
            return StoredTargets(values, ids, key, _sha(root), "reused")
        if root.exists():
            shutil.rmtree(root)
        t0 = time.time()
        values, ids = compute_targets(teacher_model, encoded, pad_id, columns, top_k, device, progress, precision)
        sizes = [len(v) for v in values]
        tensors = {"values": torch.cat(values), "offsets": torch.tensor([0, *sizes]).cumsum(0)}
        if ids is not None:
            tensors["ids"] = torch.cat(ids)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / FILE))
        tmp.rename(root)
        elapsed = time.time() - t0
        write_manifest(root, stage="teacher_targets", fingerprint_value=key, files=[FILE],
                       config={"teacher": teacher_name, "columns": None if columns is None else len(columns),
                               "top_k": top_k, "dtype": precision},
                       inputs={"teacher_sha256": teacher_sha256},
                       outputs={"rows": len(encoded), "positions": sum(sizes)},
                       timings={"compute_s": round(elapsed, 2)})
        log.info("teacher '%s': computed its targets for %d rows in %.1f s (cached at %s)", teacher_name,
                 len(encoded), elapsed, root)
        return StoredTargets(values, ids, key, _sha(root), "computed")


def _sha(root: Path) -> str:
    return str(read_json(root / "manifest.json")["files_sha256"][FILE])


def _split(tensors: dict[str, torch.Tensor], n_rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    bounds = tensors["offsets"].tolist()
    values = [tensors["values"][a:b] for a, b in zip(bounds, bounds[1:])]
    ids = [tensors["ids"][a:b] for a, b in zip(bounds, bounds[1:])] if "ids" in tensors else None
    assert len(values) == n_rows
    return values, ids


def _fits(root: Path, encoded: list[Encoded]) -> bool:
    """The stored offsets give every row as many positions as the teacher reads completion tokens."""
    from safetensors import safe_open

    with safe_open(str(root / FILE), framework="pt") as f:
        bounds = f.get_tensor("offsets").tolist()
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    fits = sizes == [len(c) for _, c in teacher_inputs(encoded)]
    if not fits:
        log.warning("%s: stored targets do not match the rows' lengths; recomputing them", root)
    return fits


# --- ablation: shuffled targets --------------------------------------------------------------

SHUFFLES = ("within", "across", "all")


def shuffle_targets(stored: StoredTargets, mode: str, seed: int) -> StoredTargets:
    """The same target vectors at other positions (`train.distill.shuffle_targets`), a pure function of
    (targets, mode, seed). Each vector moves whole (values and top-k ids together), so every position still
    gets a valid distribution — one the teacher gave somewhere else.

    within: row r's vectors permuted among row r's positions. across: at each position index j, the j-th
    vectors of the rows that have one are permuted among those rows. all: every vector of every row
    permuted, rows keeping their lengths.
    """
    if mode not in SHUFFLES:
        raise ValueError(f"unknown shuffle '{mode}'; expected one of {SHUFFLES}")
    gen = torch.Generator().manual_seed(seed)
    sizes = [len(v) for v in stored.values]
    flat = torch.arange(sum(sizes))
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    rows = list(flat.split(sizes))  # rows[r][j]: flat index of row r, position j
    if mode == "within":
        source = torch.cat([r[torch.randperm(len(r), generator=gen)] for r in rows])
    elif mode == "all":
        source = flat[torch.randperm(len(flat), generator=gen)]
    else:
        source = flat.clone()
        for j in range(max(sizes, default=0)):
            have = [r for r, n in enumerate(sizes) if n > j]
            picked = [have[i] for i in torch.randperm(len(have), generator=gen).tolist()]
            for r, s in zip(have, picked):
                source[starts[r] + j] = starts[s] + j
    values = torch.cat(stored.values)[source].split(sizes)
    ids = torch.cat(stored.ids)[source].split(sizes) if stored.ids is not None else None
    return StoredTargets(list(values), None if ids is None else list(ids), f"{stored.key}-{mode}{seed}",
                         stored.sha256, f"{stored.source}, shuffled {mode} (seed {seed})")


# --- targets from a file (`sublab audit`'s soft-label datasets) --------------------------------

def from_tensors(tensors: dict[str, torch.Tensor], key: str, sha256: str, source: str) -> StoredTargets:
    """StoredTargets from the tensors of a targets file ("values", "offsets", optional "ids")."""
    n_rows = len(tensors["offsets"]) - 1
    values, ids = _split(tensors, n_rows)
    return StoredTargets(values, ids, key, sha256, source)
