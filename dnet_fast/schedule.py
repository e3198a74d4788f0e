"""Per-epoch learning-rate schedules (warm-up, step, cosine) applied to optimizer groups in place."""

from __future__ import annotations

import math

import torch

from dnet_fast.config import OptimConfig

__all__ = ["apply_lr", "lr_factor"]


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's peak lr during ``epoch`` (0-based).

    Linear warm-up ``(epoch + 1) / warmup_epochs`` first (the LDAM-DRW recipe), then the schedule:
    ``step`` multiplies by ``gamma`` once per milestone reached, ``cosine`` follows
    ``0.5 (1 + cos(π e / E))`` down to ``min_lr``, ``constant`` stays at 1.
    """
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return 1.0


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Sets every group's ``lr`` to ``base_lr · factor`` (``base_lr`` is stored when the optimizer is built).

    A tensor ``lr`` (used by the CUDA-graph step) is updated in place so captured graphs see the new value.
    """
    for group in optimizer.param_groups:
        value = group["base_lr"] * factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
