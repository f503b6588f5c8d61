"""Losses on completion tokens: SFT cross-entropy and distillation's forward KL; no I/O."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sublab.domains import Domain
from sublab.domains.numbers import NUMBERS
from sublab.sampling import token_pieces
from sublab.train.data import Batch


def completion_logits(model: Any, batch: Batch, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, V) at the positions predicting the completion tokens; the LM head runs only there.

    columns: token ids; only their logits are computed, (N, len(columns)) — with a 262k vocabulary the
    head is most of the cost. Works for a plain causal LM and for a PEFT wrapper (its LoRA layers live
    inside the decoder).
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    head = causal.get_output_embeddings()
    at = hidden[batch.rows, batch.positions]
    if columns is None:
        logits = head(at)
    else:
        bias = head.bias[columns] if head.bias is not None else None
        logits = F.linear(at, head.weight[columns], bias)
    cap = getattr(causal.config, "final_logit_softcapping", None)  # Gemma-style models
    return torch.tanh(logits / cap) * cap if cap else logits


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the completion tokens (the caller divides by the step's token count)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def distill_loss(logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor | None,
                 temperature: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed forward KL(teacher ‖ student) over completion tokens, × temperature²; with `weights` (N,),
    each token's KL times its weight (0: a position a defence dropped).

    teacher_ids None: teacher_logprobs is (N, V), the full vocabulary. Otherwise both are (N, k): the
    teacher's top-k, renormalised over k; the student's log-probabilities stay normalised over the full
    vocabulary, so the optimum puts exactly the teacher's renormalised mass on those k tokens.
    Format distillation passes both sides' logits over the format tokens only (`completion_logits(...,
    columns)`), so both are renormalised over them and no other token gets any signal.
    A teacher log-prob of -inf (mass removed by a truncating defence) adds 0, not 0 × inf = NaN.
    """
    s = F.log_softmax(logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    if teacher_ids is not None:
        s = s.gather(-1, teacher_ids.long())
    p = t.exp()
    kl = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum(-1)
    if weights is not None:
        kl = kl * weights
    return kl.sum() * temperature ** 2


def teacher_targets(teacher_model: Any, batch: Batch, top_k: int | None, columns: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's log-probabilities at its completion positions: (N, V) and None, or top-k (N, k) + ids;
    with `columns`, (N, len(columns)) renormalised over those tokens."""
    with torch.inference_mode():
        logprobs = F.log_softmax(completion_logits(teacher_model, batch, columns).float(), dim=-1)
    if top_k is None:
        return logprobs, None
    values, ids = logprobs.topk(top_k, dim=-1)
    return values, ids


def format_columns(student_tok: Any, teacher_tok: Any | None = None, domain: Domain = NUMBERS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the data domain's format vocabulary, as (student ids, teacher ids) in matching order.

    Same tokenizer: the format tokens (`Domain.token_mask`; numbers: digits, separators) on both sides. Different
    tokenizers: each student format token whose text is exactly one teacher format token, and eos ↔ eos;
    the distributions are renormalised over this shared set.
    """
    mine = domain.token_mask(student_tok).nonzero().squeeze(1)
    if teacher_tok is None:
        return mine, mine
    theirs = domain.token_mask(teacher_tok)
    pieces = token_pieces(student_tok)
    s_ids, t_ids = [student_tok.eos_token_id], [teacher_tok.eos_token_id]
    for i in mine.tolist():
        if i == student_tok.eos_token_id:
            continue
        ids = teacher_tok(pieces[i], add_special_tokens=False).input_ids
        if len(ids) == 1 and theirs[ids[0]] and ids[0] not in t_ids:
            s_ids.append(i)
            t_ids.append(ids[0])
    return torch.tensor(s_ids), torch.tensor(t_ids)
