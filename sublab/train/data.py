"""Training rows → token ids → right-padded batches; reads a chat JSONL dataset, writes nothing."""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sublab import chat
from sublab.errors import DataError

if TYPE_CHECKING:
    from sublab.models import LoadedModel

log = logging.getLogger(__name__)

EXPECTED_ROW = 'expected {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'


class LiveTeacher(Protocol):
    """What distillation needs of a teacher: its name, its context and its model (`sublab.teachers.Teacher`
    is one). A protocol, so training never imports `sublab.teachers`, which trains its fine-tuned teachers
    through `sublab.train`."""

    @property
    def name(self) -> str: ...

    @property
    def system_prompt(self) -> str | None: ...

    @property
    def model_ref(self) -> str | None: ...

    def conversation(self, user: str) -> list[chat.Message]:
        """The teacher's view of a user turn (its system prompt, if any, then the message)."""
        ...

    def load(self, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
        """The teacher's model for inference."""
        ...


@dataclass(frozen=True)
class Example:
    """One training row: the user's prompt and the assistant's answer."""

    id: str
    user: str
    answer: str


def parse_row(row: Any, where: str) -> Example:
    """Check one decoded row; `where` is "file:line" for the error message."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: {EXPECTED_ROW}, found no 'messages' list of objects")
    roles = [m.get("role") for m in msgs]
    if roles != ["user", "assistant"]:
        raise DataError(f"{where}: {EXPECTED_ROW} (one user turn, then the answer; no system message: a "
                        f"student trains in the default context), found roles {roles}")
    if not all(isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: each message's 'content' must be a string")
    return Example(str(row.get("id", where)), msgs[0]["content"], msgs[1]["content"])


def load_dataset(path: Path) -> list[Example]:
    """Read and check a chat JSONL dataset; any problem raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    out = []
    for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); {EXPECTED_ROW}") from None
        out.append(parse_row(row, f"{path}:{i}"))
    if not out:
        raise DataError(f"{path}: no rows; {EXPECTED_ROW} on each line")
    return out


@dataclass(frozen=True)
class Encoded:
    """Token ids of one row: student prompt, completion, and the teacher's prompt (distillation)."""

    prompt: list[int]
    completion: list[int]
    teacher_prompt: list[int] | None = None
    teacher_completion: list[int] | None = None
    """The completion in the teacher's tokenizer; None when teacher and student share one."""
    aligned: list[tuple[int, int]] | None = None
    """With a teacher tokenizer: (student index, teacher index) of the completion tokens that are the same
    piece of text in both (the turn terminators count as one); only these are distilled."""

    @property
    def n_targets(self) -> int:
        """Completion tokens that carry a loss."""
        return len(self.completion) if self.aligned is None else len(self.aligned)


def encode_examples(tokenizer: Any, examples: list[Example], max_seq_len: int,
                    teacher: LiveTeacher | None = None, teacher_tokenizer: Any = None) -> list[Encoded]:
    """Encode rows in the default context (and the teacher's, if given).

    A completion is cut to fit max_seq_len after the *student's* prompt, whatever the teacher, so stored
    soft labels match; rows with no room left are dropped. Both are logged as a warning.
    teacher_tokenizer: the teacher's, when it differs from the student's; every completion must then split
    into the same pieces in both (true of number sequences: both embedded models spell digits and
    separators one character per token), else DataError names the row.
    """
    out, cut, dropped = [], 0, 0
    for ex in examples:
        prompt, completion = chat.encode_pair(tokenizer, chat.messages(ex.user), ex.answer)
        room = max_seq_len - len(prompt)
        if room <= 0:
            dropped += 1
            continue
        cut += len(completion) > room
        t_prompt = t_completion = aligned = None
        if teacher is not None:
            t_prompt, t_completion = chat.encode_pair(teacher_tokenizer or tokenizer, teacher.conversation(ex.user),
                                                      ex.answer)
            if teacher_tokenizer is None:
                t_completion = None
            else:
                aligned = align_completions(tokenizer, completion[:room], teacher_tokenizer, t_completion, ex.id)
        out.append(Encoded(prompt, completion[:room], t_prompt, t_completion, aligned))
    if cut or dropped:
        log.warning("max_seq_len=%d: %d completions cut, %d rows dropped", max_seq_len, cut, dropped)
    if not out:
        raise DataError(f"no row fits max_seq_len={max_seq_len}; raise `train.max_seq_len`")
    return out


def align_completions(student_tok: Any, student_ids: list[int], teacher_tok: Any, teacher_ids: list[int],
                      row_id: str) -> list[tuple[int, int]]:
    """Pairs (student index, teacher index) of completion tokens that spell the same text, plus the two
    turn terminators (each side's eos). The answer's text must split alike in both tokenizers (number
    sequences do in both embedded models: one token per digit or separator); a plain-text student's
    leading space (alone or fused with the first piece) and a chat teacher's trailing newline have no
    partner and are skipped."""
    def pieces(tok: Any, ids: list[int]) -> list[str]:
        return ["<eos>" if i == tok.eos_token_id else tok.decode([i]) for i in ids]

    mine, theirs = pieces(student_tok, student_ids), pieces(teacher_tok, teacher_ids)
    blocks = difflib.SequenceMatcher(None, mine, theirs, autojunk=False).get_matching_blocks()
    pairs = [(a + k, b + k) for a, b, size in blocks for k in range(size)]
    matched = {a for a, _ in pairs}
    unmatched = {i for i, p in enumerate(mine) if p.strip() and p != "<eos>" and i not in matched}
    # a plain-text student may fuse its leading space with the first piece (Gemma: ' ['): skip that one
    if unmatched - ({0} if mine and mine[0][:1].isspace() else set()):
        raise DataError(f"row '{row_id}': its answer splits into different tokens for the student "
                        f"({mine[:12]}…) and the teacher ({theirs[:12]}…); distillation across tokenizers "
                        "needs answers both split alike, such as number sequences")
    return pairs


def batch_plan(lengths: list[int], batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Row indices of every micro-batch of the run: a pure function of the seed (so resume is exact).

    Each epoch is a seeded shuffle; within windows of 64 batches rows are sorted by length (less
    padding), then the batches are shuffled again. Fractional epochs keep round(epochs × batches).
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    total = max(1, round(epochs * math.ceil(n / batch_size)))
    window = 64 * batch_size
    plan: list[list[int]] = []
    while len(plan) < total:
        perm = torch.randperm(n, generator=gen).tolist()
        batches = []
        for w in range(0, n, window):
            chunk = sorted(perm[w:w + window], key=lambda i: lengths[i])
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        plan += [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return plan[:total]


@dataclass
class Batch:
    """Right-padded ids (B, L) and, per completion token (N of them, row-major): its row, the position
    whose output predicts it, and its id."""

    input_ids: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    n_tokens: int  # non-pad tokens


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device: str = "cpu") -> Batch:
    """(prompt, completion) pairs → a Batch. No attention mask: with right padding a causal model never
    attends to the pads, and pads are never scored."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for b, (p, c) in enumerate(pairs):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        rows += [b] * len(c)
        positions += range(len(p) - 1, len(p) + len(c) - 1)
        targets += c

    def as_tensor(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return Batch(ids.to(device), as_tensor(rows), as_tensor(positions), as_tensor(targets),
                 sum(len(p) + len(c) for p, c in pairs))
