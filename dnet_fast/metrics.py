"""Per-class correct/total counters: on the host through the C++ engine, on the device with ``index_add_``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from dnet_fast.sampling import _C  # sampling.py is the one place the extension is loaded

__all__ = [
    "DeviceClassCounter",
    "class_counts",
    "confusion_matrix",
    "counts_from_logits",
    "merge_counts",
]


def class_counts(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class correct and total counts from integer predictions.

    Args:
        pred: (N,) integer predictions (any value; only equality with the label matters).
        label: (N,) integer labels in [0, num_classes).
        num_classes: C.

    Returns:
        (correct, total), two (C,) int64 arrays.

    Raises:
        ValueError: on a label outside [0, C), a non-integer dtype, wrong ndim or mismatched lengths.
    """
    return _C.class_counts(pred, label, num_classes)


def counts_from_logits(
    logits: np.ndarray, label: np.ndarray, num_classes: int, topk: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class correct and total counts straight from (N, C) logits, fusing the argmax / top-k.

    A sample is correct when fewer than ``topk`` classes beat its label, where a class beats the label with a
    larger logit, or an equal logit at a lower index: ties go to the lowest index, as in torch/numpy argmax.

    Args:
        logits: (N, C) float16/32/64 scores without NaN.
        label: (N,) integer labels in [0, C).
        num_classes: C, equal to ``logits.shape[1]``.
        topk: k in [1, C].

    Returns:
        (correct, total), two (C,) int64 arrays.
    """
    return _C.counts_from_logits(logits, label, num_classes, topk)


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 confusion matrix, rows = true label, columns = prediction (both in [0, C), C <= 32768)."""
    return _C.confusion_matrix(pred, label, num_classes)


def merge_counts(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum partial (correct, total) counts, e.g. from shards or ranks.

    Args:
        parts: (correct, total) pairs of (C,) integer arrays.

    Returns:
        (correct, total) summed, two (C,) int64 arrays.

    Raises:
        ValueError: on no parts, shape mismatches, negative counts or correct > total.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_counts needs at least one (correct, total) pair")
    correct = np.stack([np.asarray(c) for c, _ in parts])  # (P, C)
    total = np.stack([np.asarray(t) for _, t in parts])  # (P, C)
    return _C.merge_counts(correct, total)


class DeviceClassCounter:
    """Per-class correct/total counters that live on the training device.

    ``update`` uses only fixed-shape tensor ops and ``index_add_`` into preallocated buffers: no ``.item()``,
    ``bincount`` or ``nonzero``, hence no host sync, so it can run inside a captured CUDA graph. It counts exactly
    as ``counts_from_logits`` (same top-k rank and lowest-index tie rule).

    Args:
        num_classes: C.
        device: where the counters live.
        topk: k of the top-k criterion.
    """

    def __init__(self, num_classes: int, device: torch.device | str, topk: int = 1) -> None:
        if num_classes < 1 or not 1 <= topk <= num_classes:
            raise ValueError(f"need num_classes >= 1 and 1 <= topk <= num_classes, got {num_classes}, {topk}")
        self.num_classes = num_classes
        self.topk = topk
        self.correct = torch.zeros(num_classes, dtype=torch.int64, device=device)  # (C,)
        self.total = torch.zeros(num_classes, dtype=torch.int64, device=device)  # (C,)
        self._class_index = torch.arange(num_classes, device=device)  # (C,) for the tie rule

    def reset(self) -> None:
        """Zero the counters in place (buffer addresses stay valid for a captured graph)."""
        self.correct.zero_()
        self.total.zero_()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` (B, C) float, ``labels`` (B,) int64 in [0, C) (not checked: no sync)."""
        z_y = logits.gather(1, labels[:, None])  # (B, 1)
        lower = self._class_index[None, :] < labels[:, None]  # (B, C)
        beats = (logits > z_y) | ((logits == z_y) & lower)  # (B, C)
        hit = (beats.sum(dim=1) < self.topk).to(torch.int64)  # (B,)
        self.total.index_add_(0, labels, torch.ones_like(labels))
        self.correct.index_add_(0, labels, hit)

    def per_class_accuracy(self) -> torch.Tensor:
        """(C,) float32 correct / total, 0 for classes never seen."""
        return self.correct.to(torch.float32) / self.total.clamp_min(1).to(torch.float32)
