"""A teacher's top-k log-probabilities on every completion token of a dataset, stored beside it.

Reads a dataset JSONL and a teacher; writes `<dataset dir>/soft_labels-<teacher>-top<k>.safetensors`:
    ids       int32   (N, k)    the teacher's k most likely next tokens, per completion token
    logprobs  float32 (N, k)    their log-probabilities (over the full vocabulary, temperature 1)
    offsets   int64   (rows+1)  row r's tokens are [offsets[r], offsets[r+1])
    metadata  format, dataset_sha256, teacher, top_k
Every seed's student then distils without running the teacher (`train_student(..., soft_labels=path)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sublab.errors import ConfigError, DataError
from sublab.rundir import sha256_file
from sublab.train.data import Encoded, collate, encode_examples, load_dataset
from sublab.train.losses import teacher_targets

if TYPE_CHECKING:
    from sublab.teachers import Teacher

FORMAT = "1"


def soft_labels_path(dataset: Path, teacher_name: str, top_k: int) -> Path:
    """Where a dataset's soft labels from one teacher live: beside the dataset."""
    return Path(dataset).with_name(f"soft_labels-{teacher_name}-top{top_k}.safetensors")


def compute_soft_labels(teacher: Teacher, dataset: Path, out: Path, *, top_k: int, max_seq_len: int = 500,
                        batch_size: int = 16, device: str = "cpu", progress: bool = True) -> Path:
    """Run the teacher once over a dataset (in its own context) and store its top-k per completion token.

    max_seq_len must equal the students' `train.max_seq_len` (it decides where completions are cut).
    """
    from safetensors.torch import save_file

    loaded = teacher.load(device=device)
    encoded = encode_examples(loaded.tokenizer, load_dataset(dataset), max_seq_len, teacher)
    ids, logprobs = [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc=f"soft labels {teacher.name}",
                      disable=not progress):
        chunk = encoded[start:start + batch_size]
        batch = collate([(e.teacher_prompt or [], e.completion) for e in chunk], loaded.tokenizer.pad_token_id,
                        device)
        values, top = teacher_targets(loaded.model, batch, top_k)
        assert top is not None
        logprobs.append(values.cpu())
        ids.append(top.to(torch.int32).cpu())
    offsets = torch.tensor([0] + [len(e.completion) for e in encoded]).cumsum(0)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": torch.cat(ids), "logprobs": torch.cat(logprobs), "offsets": offsets}, str(tmp),
              metadata={"format": FORMAT, "dataset_sha256": sha256_file(dataset), "teacher": teacher.name,
                        "top_k": str(top_k)})
    os.replace(tmp, out)
    return out


class SoftLabels:
    """Stored top-k labels, checked against the dataset they claim to describe."""

    def __init__(self, path: Path, dataset_sha256: str, encoded: list[Encoded], top_k: int | None):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: soft-label file not found")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            self.ids, self.logprobs = f.get_tensor("ids"), f.get_tensor("logprobs")
            offsets = f.get_tensor("offsets")
        if meta.get("dataset_sha256") != dataset_sha256:
            raise DataError(f"{path}: computed for another dataset (sha256 {meta.get('dataset_sha256')}, "
                            f"dataset is {dataset_sha256}); recompute it with compute_soft_labels")
        if offsets.diff().tolist() != [len(e.completion) for e in encoded]:
            raise DataError(f"{path}: its token counts do not match the dataset as encoded with this "
                            "tokenizer and max_seq_len; recompute it with compute_soft_labels")
        stored_k = self.ids.shape[1]
        if top_k is not None and top_k > stored_k:
            raise ConfigError(f"`train.distill.top_k`={top_k} but {path} stores only the top {stored_k}")
        self.top_k = top_k or stored_k
        self.offsets: list[int] = offsets.tolist()

    def for_rows(self, rows: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, ids), each (N, top_k), for the completion tokens of these rows, in order."""
        idx = torch.cat([torch.arange(self.offsets[r], self.offsets[r + 1]) for r in rows])
        k = self.top_k
        return self.logprobs[idx, :k].to(device), self.ids[idx, :k].to(device)
