"""Defences against subliminal transfer, as changes to a teacher's stored distillation targets
(`train.distill.defence`, `sublab.config.DefenceConfig`).

Reads the teacher's stored targets (`StoredTargets`: per row (n_positions, n_columns) float32 log-probs
over the format columns) and, for the defences that need them, the base model's targets on the same rows
and the tokens written there; returns the defended targets (with per-position loss weights when
positions are dropped) and what the defence cost. A pure function of (teacher targets, base targets,
config, student seed): nothing here loads a model (`loop.prepare_run` computes the base's targets).

    defended, cost = apply_defence(teacher, base, written, DefenceConfig(mask="divergence", fraction=0.1),
                                   seed=0)

Zero probability is stored as -inf (truncation); `distill_loss` counts such columns as zero mass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from sublab.config import DefenceConfig
from sublab.train.targets import StoredTargets

# --- scores per position ------------------------------------------------------------------------

def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of two (P, C) log-prob tensors, in nats; columns where p has no mass add 0
    (and where only q has none, +inf)."""
    mass = p.exp()
    return torch.where(mass > 0, mass * (p - q), torch.zeros_like(p)).sum(-1)


def log_ratio(teacher: torch.Tensor, base: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """log p_teacher − log p_base of the token written at each position ((P,) column indices; −1 where
    the written token is not a format column: those positions score 0)."""
    at = written.clamp_min(0).unsqueeze(1)
    ratio = (teacher.gather(1, at) - base.gather(1, at)).squeeze(1)
    return torch.where(written >= 0, ratio, torch.zeros_like(ratio))


def count_of(fraction: float, n: int) -> int:
    """How many of n items a fraction treats: rounded, at least one (a set defence does something)."""
    return min(n, max(1, round(fraction * n))) if n else 0


def top_positions(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A (P,) bool mask of the `fraction` highest-scoring positions (ties: the earlier position first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:count_of(fraction, len(scores))]] = True
    return mask


def random_positions(n: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A (n,) bool mask of `fraction` of the positions, drawn uniformly without replacement."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:count_of(fraction, n)]] = True
    return mask


# --- transforms of the target distributions -----------------------------------------------------

def keep_top_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """Only each position's k most likely columns keep their mass, renormalised (the rest -inf)."""
    if k >= t.shape[-1]:
        return t.clone()
    kept = torch.zeros_like(t, dtype=torch.bool).scatter(-1, t.topk(k, dim=-1).indices, True)
    return F.log_softmax(t.masked_fill(~kept, -math.inf), dim=-1)


def keep_min_p(t: torch.Tensor, min_p: float) -> torch.Tensor:
    """Only columns with p ≥ min_p × max p keep their mass, renormalised (the most likely always stays)."""
    kept = t >= t.max(-1, keepdim=True).values + math.log(min_p)
    return F.log_softmax(t.masked_fill(~kept, -math.inf), dim=-1)


def with_temperature(t: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(t / temperature): the target sharpened (< 1) or flattened (> 1)."""
    return F.log_softmax(t / temperature, dim=-1)


def with_noise(t: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise of std sigma on every log-prob, renormalised."""
    return F.log_softmax(t + sigma * torch.randn(t.shape, generator=gen), dim=-1)


# --- the whole defence ----------------------------------------------------------------------------

def apply_defence(teacher: StoredTargets, base: StoredTargets | None, written: list[torch.Tensor] | None,
                  cfg: DefenceConfig, seed: int) -> tuple[StoredTargets, dict[str, Any]]:
    """The defended targets and the defence's cost (`defence_cost`).

    Args:
        teacher: the teacher's targets over the format columns (no top-k ids).
        base: the base model's targets on the same rows and columns; needed when `cfg.needs_base`.
        written: per row, the column index of the token written at each position (−1: not a format
            token); needed by `mask: log_ratio`.
        cfg: the defence.
        seed: the student's seed: random masks, noise and mixing draw from it.
    """
    assert teacher.ids is None, "defences apply to format targets"
    if cfg.needs_base and base is None:
        raise ValueError(f"defence '{cfg.name}' needs the base's targets")
    gen = torch.Generator().manual_seed(seed)
    sizes = [len(v) for v in teacher.values]
    t = torch.cat(teacher.values).float()
    b = torch.cat(base.values).float() if base is not None else None
    out, weights = t.clone(), None
    replaced = torch.zeros(len(t), dtype=torch.bool)
    rows_replaced = 0
    if cfg.mask is not None:
        assert cfg.fraction is not None  # DefenceConfig's check
        if cfg.mask == "random":
            treated = random_positions(len(t), cfg.fraction, gen)
        elif cfg.mask == "divergence":
            assert b is not None
            treated = top_positions(kl_rows(t, b), cfg.fraction)
        else:
            assert b is not None and written is not None
            treated = top_positions(log_ratio(t, b, torch.cat(written).long()), cfg.fraction)
        if cfg.action == "base":
            assert b is not None
            out[treated] = b[treated]
            replaced = treated
        else:  # drop: the positions stay in the rows (the student reads them) but carry no loss
            weights = (~treated).float()
    elif cfg.mix is not None:
        assert b is not None
        rows = random_positions(len(sizes), cfg.mix, gen)  # the rows that get the base's targets
        replaced = torch.cat([torch.full((n,), bool(r)) for n, r in zip(sizes, rows.tolist())])
        out[replaced] = b[replaced]
        rows_replaced = int(rows.sum())
    elif cfg.top_k is not None:
        out = keep_top_k(t, cfg.top_k)
    elif cfg.min_p is not None:
        out = keep_min_p(t, cfg.min_p)
    elif cfg.temperature is not None:
        out = with_temperature(t, cfg.temperature)
    else:
        assert cfg.noise is not None
        out = with_noise(t, cfg.noise, gen)
    defended = StoredTargets(list(out.split(sizes)), None, f"{teacher.key}-{cfg.name}{seed}", teacher.sha256,
                             f"{teacher.source}, defence {cfg.name} (seed {seed})",
                             None if weights is None else list(weights.split(sizes)))
    cost = defence_cost(t, out, weights, replaced, rows_replaced, len(sizes))
    return defended, {"defence": cfg.model_dump(exclude_none=True), **cost}


def defence_cost(original: torch.Tensor, defended: torch.Tensor, weights: torch.Tensor | None,
                 replaced: torch.Tensor, rows_replaced: int, n_rows: int) -> dict[str, Any]:
    """What the defence changed, for the student's manifest: the share of positions dropped from the loss
    or given another distribution, the share of rows replaced, and the mean KL between the teacher's
    original and the defended targets over the positions that still count. Both directions:
    KL(teacher ‖ defended) is infinite (None here) once truncation zeroes mass the teacher had;
    KL(defended ‖ teacher) is always finite."""
    kept = weights > 0 if weights is not None else torch.ones(len(original), dtype=torch.bool)
    forward = kl_rows(original[kept], defended[kept])
    backward = kl_rows(defended[kept], original[kept])
    n = max(1, int(kept.sum()))
    mean_forward = float(forward.sum()) / n
    return {"positions": len(original), "rows": n_rows,
            "positions_dropped": 1 - int(kept.sum()) / max(1, len(original)),
            "positions_replaced": int(replaced.sum()) / max(1, len(original)),
            "rows_replaced": rows_replaced / max(1, n_rows),
            "mean_kl_teacher_defended": mean_forward if math.isfinite(mean_forward) else None,
            "mean_kl_defended_teacher": float(backward.sum()) / n}


def written_columns(completions: list[list[int]], columns: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the column index of each completion token among `columns` (−1 where it is none)."""
    index = {int(c): i for i, c in enumerate(columns.tolist())}
    return [torch.tensor([index.get(tok, -1) for tok in c], dtype=torch.long) for c in completions]
