"""CIFAR-10-LT and CIFAR-100-LT (``cifar10_lt``, ``cifar100_lt``) from the standard CIFAR python pickles (SPEC §8)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dnet_fast.config import DataConfig
from dnet_fast.data.base import DATASETS, DataBundle, TensorSplit

__all__ = [
    "CIFAR_STATS",
    "CifarArrays",
    "LTSelection",
    "build_cifar10_lt",
    "build_cifar100_lt",
    "lt_counts",
    "official_counts",
    "read_cifar",
    "select_official",
    "select_standard",
]

# Per-channel mean/std of the CIFAR train sets (the usual published values).
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_LAYOUT = {  # folder, train files, test file, meta file, label key, names key
    10: (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    100: ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """The standard exponential profile n_c = ⌊n_max·(1/ρ)^(c/(C−1))⌋ (LDAM-DRW's ``get_img_num_per_cls``).

    Evaluated with Python floats in the reference's operation order, so the golden totals of SPEC §8 hold exactly.
    """
    factor = 1.0 / imbalance
    return np.array(
        [int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)], dtype=np.int64
    )


def official_counts(per_class: int, num_classes: int, imbalance: float, held_out: int = 25) -> np.ndarray:
    """Counts of the official variant: the profile over the ``per_class − held_out`` images left per class."""
    return lt_counts(per_class - held_out, num_classes, imbalance)


@dataclass(frozen=True)
class LTSelection:
    """Which train-file images form the LT train set and the meta/val set.

    Attributes:
        train: int64 indices into the original train set, class by class.
        val: int64 indices of the meta/val images (``k`` per class).
        overlap: int64 indices present in both (the top-up of classes with too few unused images).
    """

    train: np.ndarray
    val: np.ndarray
    overlap: np.ndarray


def select_standard(labels: np.ndarray, counts: np.ndarray, k: int, seed: int) -> LTSelection:
    """Standard variant: per class a seeded permutation; first n_c train, next k val, topped up from train.

    Args:
        labels: (N,) labels of the full train set.
        counts: (C,) LT counts.
        k: meta/val images per class.
        seed: seeds the per-class permutations.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    train, val, overlap = [], [], []
    for c, n_c in enumerate(counts):
        perm = rng.permutation(np.flatnonzero(labels == c))
        unused = perm[n_c : n_c + k]
        top_up = perm[: k - len(unused)]  # the class's own LT images, when fewer than k were left unused
        train.append(perm[:n_c])
        val.append(np.concatenate([unused, top_up]))
        overlap.append(top_up)
    return LTSelection(*(np.concatenate(parts).astype(np.int64) for parts in (train, val, overlap)))


def select_official(labels: np.ndarray, counts: np.ndarray, k: int) -> LTSelection:
    """Official variant: the last k images of each class (file order) held out, then the first n_c kept."""
    train, val = [], []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        val.append(idx[len(idx) - k :])
        train.append(idx[: len(idx) - k][:n_c])
    empty = np.zeros(0, dtype=np.int64)
    return LTSelection(np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64), empty)


@dataclass(frozen=True)
class CifarArrays:
    """A CIFAR pickle set decoded: images uint8 (N, 32, 32, 3), labels int64 (N,), class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def _unpickle(path: Path) -> dict:
    if not path.exists():
        msg = f"CIFAR file not found: {path} (data.root must contain the extracted python version)"
        raise FileNotFoundError(msg)
    with path.open("rb") as f:
        # The CIFAR distribution is pickled; only load files from a trusted download.
        return pickle.load(f, encoding="bytes")


def _images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        msg = f"{path}: b'data' must be (N, 3072) uint8, got {data.shape}"
        raise ValueError(msg)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)


def read_cifar(root: str | Path, num_classes: int) -> CifarArrays:
    """Reads CIFAR-10 or CIFAR-100 from the python pickles under ``root``."""
    folder, train_files, test_file, meta_file, label_key, names_key = _LAYOUT[num_classes]
    base = Path(root) / folder

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        batch = _unpickle(base / name)
        return _images(batch, base / name), np.asarray(batch[label_key], dtype=np.int64)

    parts = [load(name) for name in train_files]
    test_images, test_labels = load(test_file)
    names = tuple(
        n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(base / meta_file)[names_key]
    )
    return CifarArrays(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        test_images,
        test_labels,
        names,
    )


def _build(cfg: DataConfig, seed: int, num_classes: int) -> DataBundle:
    arrays = read_cifar(cfg.root, num_classes)
    per_class = int(np.bincount(arrays.train_labels, minlength=num_classes).max())
    k = cfg.val_per_class
    if cfg.cifar_variant == "official":
        counts = official_counts(per_class, num_classes, cfg.imbalance, held_out=k)
        sel = select_official(arrays.train_labels, counts, k)
    else:
        counts = lt_counts(per_class, num_classes, cfg.imbalance)
        sel = select_standard(arrays.train_labels, counts, k, seed)

    def split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray | None = None) -> TensorSplit:
        if idx is not None:
            images, labels = images[idx], labels[idx]
        return TensorSplit(torch.from_numpy(np.ascontiguousarray(images)), labels)

    mean, std = CIFAR_STATS[num_classes]
    info = {
        "default_loader": "resident",
        "variant": cfg.cifar_variant,
        "imbalance": cfg.imbalance,
        "seed": seed,
        "counts": counts.tolist(),
        "val_per_class": k,
        "train_indices": sel.train.tolist(),
        "meta_indices": sel.val.tolist(),
        "overlap": len(sel.overlap),
        "overlap_indices": sel.overlap.tolist(),
    }
    return DataBundle(
        train=split(arrays.train_images, arrays.train_labels, sel.train),
        val=split(arrays.train_images, arrays.train_labels, sel.val),
        test=split(arrays.test_images, arrays.test_labels),
        num_classes=num_classes,
        class_names=arrays.class_names,
        augment="cifar",
        mean=mean,
        std=std,
        info=info,
    )


@DATASETS.register("cifar10_lt")
def build_cifar10_lt(cfg: DataConfig, seed: int) -> DataBundle:
    """CIFAR-10-LT: exponential profile with ratio ``cfg.imbalance``, meta/val ``cfg.val_per_class`` per class.

    Args:
        cfg: uses root (holding ``cifar-10-batches-py/``), imbalance, val_per_class and cifar_variant.
        seed: seeds the per-class image choice (standard variant).
    """
    return _build(cfg, seed, 10)


@DATASETS.register("cifar100_lt")
def build_cifar100_lt(cfg: DataConfig, seed: int) -> DataBundle:
    """CIFAR-100-LT: exponential profile with ratio ``cfg.imbalance``, meta/val ``cfg.val_per_class`` per class.

    Args:
        cfg: uses root (holding ``cifar-100-python/``), imbalance, val_per_class and cifar_variant.
        seed: seeds the per-class image choice (standard variant).
    """
    return _build(cfg, seed, 100)
