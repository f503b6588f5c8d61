"""N ReLU MLPs as stacked tensors, evaluated as one batched computation (no loop over models).

Parameters are a list of (weight [N, d_in, d_out], bias [N, d_out]) pairs. Reads and writes nothing.
"""

from __future__ import annotations

import math

import torch

Params = list[tuple[torch.Tensor, torch.Tensor]]


def init_params(n_models: int, sizes: list[int], gen: torch.Generator, device: str = "cpu") -> Params:
    """Paper init: weights ~ normal(0, 1/sqrt(d_in)), biases 0. `sizes` = [d_in, *hidden, d_out]."""
    params = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        w = torch.randn(n_models, d_in, d_out, generator=gen) / math.sqrt(d_in)
        params.append((w.to(device), torch.zeros(n_models, d_out, device=device)))
    return params


def clone_params(params: Params, requires_grad: bool = False) -> Params:
    return [(w.detach().clone().requires_grad_(requires_grad), b.detach().clone().requires_grad_(requires_grad))
            for w, b in params]


def perturb(params: Params, scale: float, gen: torch.Generator) -> Params:
    """Add scale * Z / sqrt(d_in) to every weight (Z standard normal); biases unchanged."""
    if scale == 0:
        return clone_params(params)
    out = []
    for w, b in params:
        z = torch.randn(w.shape, generator=gen).to(w.device)
        out.append((w.detach() + scale * z / math.sqrt(w.shape[1]), b.detach().clone()))
    return out


def concat(*groups: Params) -> Params:
    """Stack several model groups along the model axis: [N1+N2+..., ...]."""
    return [(torch.cat([g[i][0] for g in groups]), torch.cat([g[i][1] for g in groups]))
            for i in range(len(groups[0]))]


def split(params: Params, n: int) -> list[Params]:
    """Inverse of `concat` for equal groups of n models."""
    k = params[0][0].shape[0] // n
    return [[(w[j * n:(j + 1) * n], b[j * n:(j + 1) * n]) for w, b in params] for j in range(k)]


def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits [N, B, d_out]. x is [B, d_in] (one batch shared by all models) or [N, B, d_in]."""
    h = x
    for i, (w, b) in enumerate(params):
        if h.dim() == 2:  # shared input: one GEMM against all models' weights at once
            h = torch.einsum("bi,nio->nbo", h, w).add_(b[:, None, :])
        else:
            h = torch.baddbmm(b[:, None, :], h, w)  # b + h @ w, fused
        if i < len(params) - 1:
            h = torch.relu_(h)  # in place: saves an allocation per layer (autograd keeps the output)
    return h


def accuracy(params: Params, x: torch.Tensor, y: torch.Tensor, n_classes: int = 10,
             chunk: int = 2048) -> torch.Tensor:
    """Per-model accuracy [N] of argmax over the first n_classes logits."""
    correct = torch.zeros(params[0][0].shape[0], device=x.device)
    with torch.no_grad():
        for i in range(0, len(y), chunk):
            logits = forward(params, x[i:i + chunk])[..., :n_classes]
            correct += (logits.argmax(-1) == y[i:i + chunk]).float().sum(-1)
    return correct / len(y)
