"""The meta/val set held eval-transformed on the device, with seeded meta batches (SPEC §3)."""

from __future__ import annotations

import numpy as np
import torch

from dnet_fast.data.base import DataBundle, FileSplit, TensorSplit
from dnet_fast.data.loaders import eval_batches
from dnet_fast.sampling import MetaBatchSampler

__all__ = ["META_SAMPLERS", "MetaSet", "shuffle_indices"]

META_SAMPLERS = ("balanced", "shuffle")


def shuffle_indices(num_samples: int, seed: int, step: int, m: int) -> np.ndarray:
    """Batch ``step`` of an endless stream of seeded per-pass permutations (the official reshuffling loader).

    Pass p is a permutation of range(N) seeded by (seed, p); batch s covers stream positions s·m .. s·m + m − 1.
    Unlike the official loader, a batch that reaches the end of a pass continues into the next pass rather than
    being cut short, so every batch has exactly ``m`` indices.

    Returns:
        (m,) int64.
    """
    out, pos, end = [], step * m, (step + 1) * m
    while pos < end:
        p, offset = divmod(pos, num_samples)
        perm = np.random.Generator(np.random.PCG64([seed, p])).permutation(num_samples)
        take = perm[offset : offset + (end - pos)]
        out.append(take)
        pos += len(take)
    return np.concatenate(out).astype(np.int64)


class MetaSet:
    """The meta/val images eval-transformed once and kept on the device.

    Args:
        split: the meta/val split (``bundle.val``).
        bundle: supplies the eval transform family and normalisation.
        device: where the images live.
        seed: seeds the meta batches.
        sampler: ``balanced`` (class-balanced ``MetaBatchSampler``) or ``shuffle`` (reshuffle per pass).
        crop_size: eval crop for ImageNet-style data.
        batch_size: images per eval-transform pass while building.

    Attributes:
        images: float32 (N, 3, H, W) normalised, on ``device``.
        labels: int64 (N,) on ``device``.
        indices: (N,) int64 positions of the meta images in their source, for the run's provenance:
            ``bundle.info["meta_indices"]`` when ``split`` is ``bundle.val`` and the dataset records it (CIFAR-LT:
            rows of the train file; splits: lines of the val list), else 0..N−1.
    """

    def __init__(
        self,
        split: TensorSplit | FileSplit,
        bundle: DataBundle,
        *,
        device: str | torch.device,
        seed: int,
        sampler: str = "balanced",
        crop_size: int = 224,
        batch_size: int = 256,
    ) -> None:
        if sampler not in META_SAMPLERS:
            msg = f"unknown meta sampler '{sampler}'; valid: {', '.join(META_SAMPLERS)}"
            raise ValueError(msg)
        self.device, self.seed, self.sampler = torch.device(device), seed, sampler
        parts = list(eval_batches(split, bundle, batch_size, self.device, crop_size))
        self.images = torch.cat([x for x, _ in parts])  # (N, 3, H, W)
        self.labels = torch.cat([y for _, y in parts])  # (N,)
        self.labels_np = np.asarray(split.labels, dtype=np.int64)
        recorded = bundle.info.get("meta_indices") if split is bundle.val else None
        self.indices = np.asarray(recorded if recorded is not None else np.arange(len(split)), dtype=np.int64)
        self._balanced = (
            MetaBatchSampler(self.labels_np, bundle.num_classes, seed=seed) if sampler == "balanced" else None
        )

    def __len__(self) -> int:
        return len(self.labels_np)

    def batch_indices(self, step: int, m: int) -> np.ndarray:
        """Sample indices of meta batch ``step``, (m,) int64; a pure function of (seed, step)."""
        if self._balanced is not None:
            return self._balanced.batch(step, m)
        return shuffle_indices(len(self), self.seed, step, m)

    def batch(self, step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta batch ``step``: x float32 (m, 3, H, W), y int64 (m,), both on the device."""
        idx = torch.from_numpy(self.batch_indices(step, m)).to(self.device)  # (m,)
        return self.images[idx], self.labels[idx]
