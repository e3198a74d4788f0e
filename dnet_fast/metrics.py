"""Per-class correct/total counters: on the host through the C++ engine, on the device with ``index_add_``.

Every counter here counts alike: a sample is correct when fewer than ``topk`` classes beat its label, where a class
beats the label with a larger logit, or an equal logit at a lower index (ties go to the lowest index, as in
torch/numpy argmax). A row holding any non-finite logit (NaN, +inf or -inf) counts in ``total`` but never in
``correct``, so a diverged model scores 0, not 1.
"""

from __future__ import annotations

import numpy as np
import torch

from dnet_fast.sampling import _C  # sampling.py is the one place the extension is loaded

__all__ = ["DeviceClassCounter", "HostClassCounter", "class_counter", "counts_from_logits"]

_HOST_DTYPES = (torch.float16, torch.float32, torch.float64)  # what the C++ engine reads without a cast


def counts_from_logits(
    logits: np.ndarray, label: np.ndarray, num_classes: int, topk: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class correct and total counts straight from (N, C) logits, fusing the top-k rank into one pass.

    Args:
        logits: (N, C) float16/32/64 scores; rows with NaN or ±inf are counted wrong.
        label: (N,) integer labels in [0, C).
        num_classes: C, equal to ``logits.shape[1]``.
        topk: k in [1, C].

    Returns:
        (correct, total), two (C,) int64 arrays.

    Raises:
        ValueError: on a label outside [0, C), a bad dtype or shape, or topk outside [1, C].
    """
    return _C.counts_from_logits(logits, label, num_classes, topk)


class _Counts:
    """The (C,) int64 ``correct`` / ``total`` buffers both counters share, zeroed in place by ``reset``."""

    def __init__(self, num_classes: int, device: torch.device | str, topk: int) -> None:
        if num_classes < 1 or not 1 <= topk <= num_classes:
            raise ValueError(f"need num_classes >= 1 and 1 <= topk <= num_classes, got {num_classes}, {topk}")
        self.num_classes = num_classes
        self.topk = topk
        self.correct = torch.zeros(num_classes, dtype=torch.int64, device=device)  # (C,)
        self.total = torch.zeros(num_classes, dtype=torch.int64, device=device)  # (C,)

    def reset(self) -> None:
        """Zero the counters in place (buffer addresses stay valid, e.g. for a captured graph)."""
        self.correct.zero_()
        self.total.zero_()

    def per_class_accuracy(self) -> torch.Tensor:
        """(C,) float32 correct / total, 0 for classes never seen."""
        return self.correct.to(torch.float32) / self.total.clamp_min(1).to(torch.float32)


class HostClassCounter(_Counts):
    """Per-class correct/total counters on the CPU, counted by the C++ engine (one pass per row, GIL released).

    Args:
        num_classes: C.
        topk: k of the top-k criterion.
    """

    def __init__(self, num_classes: int, topk: int = 1) -> None:
        super().__init__(num_classes, "cpu", topk)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` (B, C) float CPU tensor, ``labels`` (B,) integer CPU tensor in [0, C).

        Raises:
            ValueError: on tensors off the CPU, a label outside [0, C) or mismatched shapes (nothing is counted).
        """
        if logits.device.type != "cpu" or labels.device.type != "cpu":
            raise ValueError(f"HostClassCounter needs CPU tensors, got {logits.device} and {labels.device}")
        z, y = logits.detach(), labels.detach()
        if z.dtype not in _HOST_DTYPES:
            z = z.float()  # bfloat16 widens to float32 exactly, so ranks and ties are unchanged
        correct, total = _C.counts_from_logits(z.numpy(), y.numpy(), self.num_classes, self.topk)
        self.correct += torch.from_numpy(correct)
        self.total += torch.from_numpy(total)


class DeviceClassCounter(_Counts):
    """Per-class correct/total counters that live on the training device.

    ``update`` uses only fixed-shape tensor ops and ``index_add_`` into preallocated buffers: no ``.item()``,
    ``bincount`` or ``nonzero``, hence no host sync, so it can run inside a captured CUDA graph. It counts exactly
    as ``counts_from_logits``.

    Args:
        num_classes: C.
        device: where the counters live.
        topk: k of the top-k criterion.
    """

    def __init__(self, num_classes: int, device: torch.device | str, topk: int = 1) -> None:
        super().__init__(num_classes, device, topk)
        self._class_index = torch.arange(num_classes, device=device)  # (C,) for the tie rule

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` (B, C) float, ``labels`` (B,) int64 in [0, C) (not checked: no sync)."""
        z_y = logits.gather(1, labels[:, None])  # (B, 1)
        lower = self._class_index[None, :] < labels[:, None]  # (B, C)
        beats = (logits > z_y) | ((logits == z_y) & lower)  # (B, C)
        # x - x is +0 for finite x and NaN for NaN/inf; a sum of zeros cannot overflow (cheaper than isfinite).
        finite = (logits - logits).sum(dim=1) == 0  # (B,)
        hit = ((beats.sum(dim=1) < self.topk) & finite).to(torch.int64)  # (B,)
        self.total.index_add_(0, labels, torch.ones_like(labels))
        self.correct.index_add_(0, labels, hit)


def class_counter(
    num_classes: int, device: torch.device | str, topk: int = 1
) -> HostClassCounter | DeviceClassCounter:
    """The counter for logits on ``device``: the C++ host counter on the CPU, ``DeviceClassCounter`` elsewhere."""
    if torch.device(device).type == "cpu":
        return HostClassCounter(num_classes, topk)
    return DeviceClassCounter(num_classes, device, topk)
