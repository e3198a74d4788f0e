"""Per-epoch learning-rate schedules (the SCHEDULES registry, warm-up) applied to optimizer groups in place."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dnet_fast.config import OptimConfig
from dnet_fast.registry import Registry

__all__ = ["SCHEDULES", "apply_lr", "lr_factor"]

#: name -> ``fn(epoch, cfg) -> factor`` of the peak lr after warm-up (``optim.schedule``).
SCHEDULES: Registry[Callable[[int, OptimConfig], float]] = Registry("lr schedule")


@SCHEDULES.register("step")
def _step(epoch: int, cfg: OptimConfig) -> float:
    """``gamma`` once per milestone reached."""
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@SCHEDULES.register("cosine")
def _cosine(epoch: int, cfg: OptimConfig) -> float:
    """``0.5 (1 + cos(π e / E))`` down to ``min_lr``."""
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


@SCHEDULES.register("constant")
def _constant(epoch: int, cfg: OptimConfig) -> float:  # noqa: ARG001  (same signature as every schedule)
    """Always 1."""
    return 1.0


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's peak lr during ``epoch`` (0-based).

    Linear warm-up ``(epoch + 1) / warmup_epochs`` first (the LDAM-DRW recipe), then ``SCHEDULES[cfg.schedule]``.
    """
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    return SCHEDULES.get(cfg.schedule)(epoch, cfg)


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
