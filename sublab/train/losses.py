"""Losses on completion tokens: SFT cross-entropy and distillation's forward KL; no I/O."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sublab.train.data import Batch


def completion_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits (N, V) at the positions predicting the completion tokens; the LM head runs only there.

    Works for a plain causal LM and for a PEFT wrapper (its LoRA layers live inside the decoder).
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    logits = causal.get_output_embeddings()(hidden[batch.rows, batch.positions])
    cap = getattr(causal.config, "final_logit_softcapping", None)  # Gemma-style models
    return torch.tanh(logits / cap) * cap if cap else logits


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the completion tokens (the caller divides by the step's token count)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def distill_loss(logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor | None,
                 temperature: float = 1.0) -> torch.Tensor:
    """Summed forward KL(teacher ‖ student) over completion tokens, × temperature².

    teacher_ids None: teacher_logprobs is (N, V), the full vocabulary. Otherwise both are (N, k): the
    teacher's top-k, renormalised over k; the student's log-probabilities stay normalised over the full
    vocabulary, so the optimum puts exactly the teacher's renormalised mass on those k tokens.
    """
    s = F.log_softmax(logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    if teacher_ids is not None:
        s = s.gather(-1, teacher_ids.long())
    return (t.exp() * (t - s)).sum() * temperature ** 2


def teacher_targets(teacher_model: Any, batch: Batch, top_k: int | None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's log-probabilities at its completion positions: (N, V) and None, or top-k (N, k) + ids."""
    with torch.inference_mode():
        logprobs = F.log_softmax(completion_logits(teacher_model, batch).float(), dim=-1)
    if top_k is None:
        return logprobs, None
    values, ids = logprobs.topk(top_k, dim=-1)
    return values, ids
