"""Training loops: N teachers (cross-entropy on digit logits) and their students (KL on teacher logits).

All models of a phase are one stacked parameter set and one torch.optim.Adam: Adam is elementwise and
each model's loss depends only on its own slice, so this equals N independent optimisers. Every model
sees the same minibatches (they differ only by init). Reads and writes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sublab.mnist.config import MnistConfig
from sublab.mnist.model import Params, clone_params, concat, forward, split

N_CLASSES = 10


def _optimizer(params: Params, cfg: MnistConfig, lr: float) -> torch.optim.Optimizer:
    flat = [t for pair in params for t in pair]
    if cfg.weight_decay_style == "decoupled":
        return torch.optim.AdamW(flat, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(flat, lr=lr, weight_decay=cfg.weight_decay)


def _batches(n: int, batch_size: int, epochs: int, gen: torch.Generator, device: torch.device):
    """Index tensors of each minibatch: a fresh shuffle every epoch, the last batch may be short."""
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        yield from perm.split(batch_size)


def _mean(values: list[torch.Tensor]) -> float:
    return torch.stack(values).mean().item() if values else float("nan")


def _steps(n: int, batch_size: int, epochs: int) -> int:
    return epochs * -(-n // batch_size)


def train_teacher(cfg: MnistConfig, init: Params, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                  progress: bool = False, desc: str = "teacher") -> tuple[Params, float]:
    """Train N teachers from `init` with cross-entropy on the first 10 logits only; aux logits get no
    loss. Returns (trained params, mean loss of the last epoch)."""
    params = clone_params(init, requires_grad=True)
    opt = _optimizer(params, cfg, cfg.lr)
    steps = _steps(len(y), cfg.batch_size, cfg.epochs)
    last_epoch, running = steps - _steps(len(y), cfg.batch_size, 1), []
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for step, idx in enumerate(_batches(len(y), cfg.batch_size, cfg.epochs, gen, x.device)):
            logits = forward(params, x[idx])[..., :N_CLASSES]  # [N, B, 10]
            yb = y[idx].expand(logits.shape[0], -1)
            loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(-1)  # [N]
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if step >= last_epoch:
                running.append(loss.detach().mean())
            bar.update()
    return clone_params(params), _mean(running)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-model KL(softmax(teacher/T) || softmax(student/T)), mean over the batch: [N]."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def train_students(cfg: MnistConfig, teachers: Params, inits: dict[str, Params], inputs: torch.Tensor,
                   gen: torch.Generator, progress: bool = False,
                   desc: str = "students") -> tuple[dict[str, Params], dict[str, float]]:
    """Distil the N teachers into every arm of `inits` ({arm: params of N students}) at once.

    Arm 'student_all_logits' matches all 10+aux logits; every other arm matches the aux logits only.
    Student i of each arm learns from teacher i. Returns ({arm: params}, {arm: last-epoch mean KL}).
    """
    arms = list(inits)
    n = teachers[0][0].shape[0]
    params = clone_params(concat(*inits.values()), requires_grad=True)  # [len(arms) * N, ...]
    opt = _optimizer(params, cfg, cfg.student_lr_)
    epochs = cfg.student_epochs_
    steps = _steps(len(inputs), cfg.batch_size, epochs)
    last_epoch, running = steps - _steps(len(inputs), cfg.batch_size, 1), {a: [] for a in arms}
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for step, idx in enumerate(_batches(len(inputs), cfg.batch_size, epochs, gen, inputs.device)):
            xb = inputs[idx]
            with torch.no_grad():
                target = forward(teachers, xb)  # [N, B, 10 + aux]
            logits = forward(params, xb)  # [arms * N, B, 10 + aux]
            total = 0.0
            for j, arm in enumerate(arms):
                s = logits[j * n:(j + 1) * n]
                cut = 0 if arm == "student_all_logits" else N_CLASSES
                loss = _kl(s[..., cut:], target[..., cut:], cfg.temperature)  # [N]
                total = total + loss.sum()
                if step >= last_epoch:
                    running[arm].append(loss.detach().mean())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            bar.update()
    trained = dict(zip(arms, split(clone_params(params), n)))
    return trained, {a: _mean(v) for a, v in running.items()}
