"""Many / medium / few shot groups from training counts and per-group accuracies (SPEC §10)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FEW_THRESHOLD", "GROUPS", "MANY_THRESHOLD", "group_accuracies", "group_sizes", "shot_groups"]

MANY_THRESHOLD = 100  # many-shot: strictly more than this many training images
FEW_THRESHOLD = 20  # few-shot: strictly fewer than this many training images
GROUPS = ("many", "medium", "few")


def shot_groups(train_counts: np.ndarray) -> np.ndarray:
    """Names the shot group of every class.

    Args:
        train_counts: (C,) training images per class.

    Returns:
        (C,) array of "many" (> 100), "medium" (20–100 inclusive) or "few" (< 20).
    """
    counts = np.asarray(train_counts)
    return np.where(counts > MANY_THRESHOLD, "many", np.where(counts < FEW_THRESHOLD, "few", "medium"))


def group_sizes(train_counts: np.ndarray) -> dict[str, int]:
    """Number of classes in each shot group."""
    groups = shot_groups(train_counts)
    return {g: int((groups == g).sum()) for g in GROUPS}


def group_accuracies(per_class_acc: np.ndarray, train_counts: np.ndarray) -> dict[str, float]:
    """Mean per-class accuracy of each shot group.

    Args:
        per_class_acc: (C,) accuracies in [0, 1] (NaN entries, e.g. classes absent from the test set, are skipped).
        train_counts: (C,) training images per class.

    Returns:
        ``many``, ``medium``, ``few`` (NaN for an empty group) and ``overall`` (mean over all classes).
    """
    acc = np.asarray(per_class_acc, dtype=np.float64)
    groups = shot_groups(train_counts)
    if acc.shape != groups.shape:
        msg = f"per_class_acc has shape {acc.shape} but train_counts has {groups.shape}"
        raise ValueError(msg)
    out = {g: _nanmean(acc[groups == g]) for g in GROUPS}
    out["overall"] = _nanmean(acc)
    return out


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on empty input; an empty group is simply NaN.
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan
