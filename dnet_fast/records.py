"""What a run records at each A_C refresh: the per-class history row and the class-weight spread (from the stack)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.history import HistoryRow
from dnet_fast.meta import class_weights
from dnet_fast.stack import TrainingStack

__all__ = ["TrainCounts", "history_row", "weight_stats"]


def _loss_factors(stack: TrainingStack) -> np.ndarray | None:
    """(C,) factor on each sample's loss now: Difficulty-Net's w times the loss's own class weights (CB, LDAM-DRW,
    CDB-CE); None when weights are per sample (MWN) and the loss has none."""
    w = stack.meta.class_weights()  # ones for off, None for mwn
    own = getattr(stack.criterion, "class_weight", None)
    if w is None and own is None:
        return None
    factors = torch.ones(stack.meta.num_classes, dtype=torch.float64)
    for part in (w, own):
        if part is not None:
            factors = factors * part.detach().double().cpu()  # sync point
    return factors.numpy()


def _difficulties(stack: TrainingStack, normalize: str) -> np.ndarray | None:
    meta = stack.meta
    if meta.diffnet is None:
        return None
    with torch.no_grad():
        _, d = class_weights(meta.diffnet, meta.acc, normalize)
    return d.double().cpu().numpy()  # sync point


class TrainCounts:
    """Per-class train accuracy over the batches since the last refresh, from the step's running counters
    (summed over ranks under torchrun)."""

    def __init__(self, counter: Any, dist: Collective = LOCAL) -> None:
        self.counter, self.dist = counter, dist
        self.mark()

    def mark(self) -> None:
        """Starts a new interval at the counters' current values."""
        self._since = (self.counter.correct.clone(), self.counter.total.clone())

    def accuracy(self) -> np.ndarray:
        """(C,) accuracy since the mark; NaN for classes without a sample in the interval."""
        correct, total = self.dist.summed(self.counter.correct - self._since[0], self.counter.total - self._since[1])
        correct, total = correct.double().cpu(), total.double().cpu()  # sync point
        return torch.where(total > 0, correct / total.clamp_min(1), torch.nan).numpy()


def history_row(stack: TrainingStack, normalize: str, step: int, epoch: int, acc: torch.Tensor,
                train_acc: np.ndarray | None, *, measured: bool) -> HistoryRow:
    """The refresh just installed in the meta mode and the loss, as a history row (``normalize``:
    ``diffnet.normalize``)."""
    host_acc = acc.detach().double().cpu().numpy()  # sync point
    return HistoryRow(step=step, epoch=epoch, acc=host_acc, difficulty=_difficulties(stack, normalize),
                      weights=_loss_factors(stack), train_acc=train_acc, val_acc=host_acc if measured else None)


def weight_stats(stack: TrainingStack) -> dict[str, float]:
    """w_min, w_max and E of the meta mode's current class weights (empty for MWN's per-sample weights)."""
    w = stack.meta.class_weights()
    if w is None:
        return {}
    w = w.detach().float().cpu()  # sync point
    e = float(-(torch.log(w.clamp_min(1e-12))).mean())
    return {"w_min": float(w.min()), "w_max": float(w.max()), "E": e}
