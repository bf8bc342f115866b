"""The one learning-rate schedule (warm-up, then cosine), and SGD as DESIGN §2.1 configures it.

The rate is a pure function of the step (an epoch for boosting and adapting, an optimiser step for ToyWorld
pretraining), so a checkpoint's schedule state is that number.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from caspl.config import OptimConfig


def warmup_cosine(step: int, total: int, peak: float, warmup: int = 0, *, warmup_lr: float | None = None,
                  floor: float = 0.0, end_at_floor: bool = False) -> float:
    """The rate at 0-based `step` of `total`.

    Warm-up steps run at the constant `warmup_lr`, or ramp linearly up to `peak` when it is None. Then a cosine
    falls from `peak` toward `floor`; `end_at_floor` makes the last step exactly `floor` (else the cosine would reach
    it one step after the end, as the paper's epoch schedule does).
    """
    if step < warmup:
        return peak * (step + 1) / warmup if warmup_lr is None else warmup_lr
    span = total - warmup - (1 if end_at_floor else 0)
    progress = min((step - warmup) / max(span, 1), 1.0)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at_epoch(cfg: OptimConfig, epoch: int) -> float:
    """Rate of 0-based `epoch`: `warmup_lr` for the warm-up epochs, then cosine from `lr` toward 0."""
    return warmup_cosine(epoch, cfg.epochs, cfg.lr, cfg.warmup_epochs, warmup_lr=cfg.warmup_lr)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
