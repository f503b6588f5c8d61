"""Shared machinery for trait evaluations: the sampled-completion record, a seeded batched sampler, and
continuation log-probabilities. Used by `sublab.evals.animals` and `sublab.evals.misalignment`.

Reads and writes nothing itself; eval modules write records with `sublab.rundir.JsonlAppender`.

    from sublab.evals.common import sample_completions, continuation_logprobs
    convs = [chat.messages("Name your favorite animal using only one word.")]
    texts = sample_completions(lm, convs, n=10, temperature=1.0, max_new_tokens=12, seed=0)
    logps = continuation_logprobs(lm, convs, [" Owl."])

Reproducibility: sample j of conversation i draws from its own torch.Generator seeded by
(seed, *keys[i], j) (keys default to (i,)), so a completion does not depend on the batch it landed
in or on which other conversations were asked: a resumed run equals an uninterrupted one (up to
float rounding of padded batches, which can in rare cases flip a near-tie).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from sublab import chat
from sublab.chat import Message
from sublab.errors import RunDirError
from sublab.rundir import read_jsonl
from sublab.sampling import Sampling, decode_batch, left_pad, row_generator

Conversation = list[Message]
R = TypeVar("R", bound=BaseModel)


class QuestionRecord(BaseModel):
    """What every eval record starts with: which file, model and question it belongs to (one JSONL line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """Stable within one eval file, e.g. 'q07-s003' (question 7, sample 3) or 'q07-owl' (a candidate)."""
    eval: str
    """The eval's name, e.g. 'animal_sampled' (also the file stem)."""
    model: str
    """The evaluated model's name (base, teacher or student directory name)."""
    question_id: int
    """Index of the question in the protocol's list."""
    question: str
    """The user message exactly as asked (a numbers prefix included)."""


class EvalRecord(QuestionRecord):
    """One sampled completion to one eval question; the score is computed later."""

    sample_idx: int
    completion: str
    seed: int
    """The eval seed; the sample's generator is seeded by (seed, question key, sample_idx)."""
    system: str | None = None
    """The system prompt used; None = the model's default context (see `sublab.chat`)."""


# --- helpers -------------------------------------------------------------------------------------

def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def prompt_ids(tokenizer: Any, conversation: Conversation, answer_prefix: str = "") -> list[int]:
    """Token ids of the rendered prompt plus the start of the assistant's answer, if any."""
    start = chat.answer_lead(tokenizer) + answer_prefix if answer_prefix else ""
    text = chat.render_prompt(tokenizer, conversation) + start
    return tokenizer(text, add_special_tokens=False).input_ids


def read_done(path: Any, record_type: type[R], **expected: Any) -> dict[str, R]:
    """Records already in an eval file, by id, read through `record_type` (a bad row fails with its
    line). Each `expected` field (e.g. model='base', seed=0) must match, else the file belongs to another
    run: RunDirError."""
    done: dict[str, R] = {}
    for i, row in enumerate(read_jsonl(path, missing_ok=True), 1):
        try:
            record = record_type.model_validate(row)
        except ValidationError as e:  # the message names the field
            raise RunDirError(f"{path}: row {i} is not a valid {record_type.__name__}: {e}") from None
        for field, want in expected.items():
            got = getattr(record, field)
            if got != want:
                raise RunDirError(f"{path}: row {i} has {field}={json.dumps(got)}, but this run has "
                                  f"{field}={json.dumps(want)}; the file belongs to another run. "
                                  f"Delete it or write to another path.")
        done[getattr(record, "id")] = record
    return done


# --- sampling ------------------------------------------------------------------------------------

def sample_completions(lm: Any, conversations: Sequence[Conversation], n: int, temperature: float = 1.0,
                       max_new_tokens: int = 12, seed: int = 0, batch_size: int = 64, *,
                       keys: Sequence[Sequence[int]] | None = None, answer_prefix: str = "",
                       desc: str = "sample") -> list[list[str]]:
    """`n` completions of each conversation (a `LoadedModel` `lm`), batched with left padding.

    Args:
        lm: a `sublab.models.LoadedModel`.
        conversations: each ends with a user turn (`sublab.chat.messages`).
        n: completions per conversation.
        temperature: 0 = greedy; otherwise plain softmax sampling (no top-p), as in the paper.
        max_new_tokens: length cap in tokens.
        seed: sample j of conversation i uses a generator seeded by (seed, *keys[i], j).
        batch_size: rows (samples) per decode batch; does not change results.
        keys: per-conversation seeding keys, default (i,). Give stable ids (e.g. question ids) so a
            subset or a resumed run draws the same samples.
        answer_prefix: text the assistant's answer starts with (not included in the completion).
    Returns:
        completions[i][j]: the decoded text of sample j of conversation i, special tokens removed.
    """
    out: list[list[str]] = [[""] * n for _ in conversations]
    for batch in iter_completions(lm, conversations, n, temperature, max_new_tokens, seed, batch_size,
                                  keys=keys, answer_prefix=answer_prefix, desc=desc):
        for i, j, text in batch:
            out[i][j] = text
    return out


def iter_completions(lm: Any, conversations: Sequence[Conversation], n: int, temperature: float = 1.0,
                     max_new_tokens: int = 12, seed: int = 0, batch_size: int = 64, *,
                     keys: Sequence[Sequence[int]] | None = None, answer_prefix: str = "",
                     desc: str = "sample") -> Iterator[list[tuple[int, int, str]]]:
    """`sample_completions` one decode batch at a time: yields [(conversation i, sample j, text)], so a
    caller can append each batch to disk as it finishes. Shows a progress bar (rate, ETA)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    keys = [(i,) for i in range(len(conversations))] if keys is None else keys
    if len(keys) != len(conversations):
        raise ValueError(f"{len(keys)} keys for {len(conversations)} conversations")
    if getattr(lm, "backend", "local") == "openai":  # a `sublab.api.ApiModel`: the endpoint samples
        if answer_prefix:
            raise ValueError("an openai: model cannot be given the start of its answer")
        yield from lm.iter_completions(conversations, n, temperature, max_new_tokens, seed, batch_size, keys, desc)
        return
    tok = lm.tokenizer
    sampling = Sampling(temperature=temperature, greedy=temperature == 0)  # plain softmax, as the paper
    encoded = [prompt_ids(tok, c, answer_prefix) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
    jobs = [(i, j) for i in order for j in range(n)]
    with tqdm(total=len(jobs), desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            distinct = list(dict.fromkeys(i for i, _ in batch))
            slot = {i: k for k, i in enumerate(distinct)}
            gens = [row_generator(seed, [*keys[i], j]) for i, j in batch]
            new = decode_batch(lm.model, tok, [encoded[i] for i in distinct], gens, sampling, max_new_tokens,
                               rows=[slot[i] for i, _ in batch])
            yield [(i, j, tok.decode(ids, skip_special_tokens=True)) for (i, j), (ids, _) in zip(batch, new)]
            bar.update(len(batch))


# --- scoring given continuations -----------------------------------------------------------------

@torch.inference_mode()
def continuation_logprobs(lm: Any, conversations: Sequence[Conversation], continuations: Sequence[str],
                          batch_size: int = 16, *, answer_prefix: str = "") -> list[float]:
    """log P(continuation | prompt) summed over the continuation's tokens, one per pair.

    The prompt is `render_prompt(conversation) + answer_prefix`; the continuation is tokenised on its
    own (as `sublab.chat.encode_pair` does), so the boundary between them is exact. A continuation
    that tokenises to nothing scores 0.0 (log 1).
    """
    if len(conversations) != len(continuations):
        raise ValueError(f"{len(conversations)} conversations for {len(continuations)} continuations")
    tok, model = lm.tokenizer, lm.model
    device = device_of(model)
    pairs = [(prompt_ids(tok, c, answer_prefix), tok(x, add_special_tokens=False).input_ids)
             for c, x in zip(conversations, continuations)]
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        ids, mask, positions = left_pad([p + x for p, x in batch], tok.pad_token_id, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                       position_ids=positions).logits.float(), dim=-1)
        width = ids.shape[1]
        for b, (_, x) in enumerate(batch):
            if not x:
                out.append(0.0)
                continue
            # Token t at column c is predicted by column c-1; the continuation fills the last len(x) columns.
            cols = torch.arange(width - len(x), width, device=device)
            out.append(float(logp[b, cols - 1, ids[b, cols]].sum()))
    return out
