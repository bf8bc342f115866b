"""SGD with a constant warm-up and a cosine schedule (DESIGN §2.1), as a pure function of the epoch.

Because the learning rate depends only on the epoch number, the schedule's state in a checkpoint is that number.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from caspl.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at_epoch(cfg: OptimConfig, epoch: int) -> float:
    """Learning rate of 0-based `epoch`: `warmup_lr` for the warm-up epochs, then cosine from `lr` toward 0."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    progress = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
