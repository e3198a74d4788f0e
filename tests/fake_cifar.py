"""Fake CIFAR-10/100 python folders in the real pickle layout, with random pixels, for the CIFAR-LT tests."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["cifar_rows", "write_cifar10", "write_cifar100"]

Part = tuple[np.ndarray, Sequence[int]]  # (rows (n, 3072) uint8, labels (n,))


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random images as CIFAR stores them: uint8 rows of 3072 = 3 planes of 32×32 (CHW)."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the released CIFAR files


def write_cifar10(root: Path, train: Sequence[Part], test: Part) -> Path:
    """Writes and returns ``root/cifar-10-batches-py``.

    One ``data_batch_<k>`` per ``train`` part, ``test_batch`` and ``batches.meta`` (class names ``c0``..``c9``).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for k, (rows, labels) in enumerate(train, start=1):
        _dump(folder / f"data_batch_{k}", {b"data": rows, b"labels": list(labels)})
    _dump(folder / "test_batch", {b"data": test[0], b"labels": list(test[1])})
    _dump(folder / "batches.meta", {b"label_names": [f"c{c}".encode() for c in range(10)]})
    return folder


def write_cifar100(root: Path, train: Part, test: Part) -> Path:
    """Writes and returns ``root/cifar-100-python``.

    ``train`` and ``test`` with fine labels (coarse labels all 0) and ``meta`` (class names ``n0``..``n99``).
    """
    folder = root / "cifar-100-python"
    folder.mkdir()
    n = len(train[0])
    _dump(folder / "train", {b"data": train[0], b"fine_labels": list(train[1]), b"coarse_labels": [0] * n})
    _dump(folder / "test", {b"data": test[0], b"fine_labels": list(test[1])})
    _dump(folder / "meta", {b"fine_label_names": [f"n{c}".encode() for c in range(100)]})
    return folder
