"""Data containers (splits, bundles, loader specs) and the DATASETS / LOADERS registries."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dnet_fast.data.policies import Recipe
from dnet_fast.registry import Registry

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOADERS",
    "Batch",
    "DataBundle",
    "FileSplit",
    "Loader",
    "LoaderSpec",
    "SampleError",
    "Split",
    "TensorSplit",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: Registry = Registry("dataset")  # name -> build(cfg: DataConfig, seed: int) -> DataBundle
LOADERS: Registry = Registry("loader")  # name -> build(split, spec: LoaderSpec) -> Loader

Batch = tuple[torch.Tensor, torch.Tensor]  # (x float32 (B, 3, H, W) normalised on the device, y int64 (B,))

# What Pillow raises for bad image bytes: UnidentifiedImageError and truncation are OSErrors; some plugins raise
# ValueError, SyntaxError, EOFError, struct.error or zlib.error; DecompressionBombError derives from Exception.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class SampleError(ValueError):
    """A sample that cannot be decoded; the message names where it is stored (file, or shard and sample key)."""


def _as_labels(labels: Any) -> np.ndarray:
    out = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    if out.ndim != 1:
        msg = f"labels must be 1-D, got shape {out.shape}"
        raise ValueError(msg)
    if out.size and out.min() < 0:
        msg = f"labels must be >= 0, got {int(out.min())}"
        raise ValueError(msg)
    return out


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """A split held as decoded pixels.

    Attributes:
        images: uint8 tensor (N, H, W, 3), RGB, usually on the CPU.
        labels: int64 array (N,) of class ids.
    """

    images: torch.Tensor
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _as_labels(self.labels))
        im = self.images
        if im.dtype != torch.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            msg = f"TensorSplit.images must be uint8 (N, H, W, 3), got {im.dtype} {tuple(im.shape)}"
            raise ValueError(msg)
        if im.shape[0] != len(self.labels):
            msg = f"TensorSplit has {im.shape[0]} images but {len(self.labels)} labels"
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> TensorSplit:
        """The split restricted to ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return TensorSplit(self.images[torch.from_numpy(idx)], self.labels[idx])


@dataclass(frozen=True, eq=False)
class FileSplit:
    """A split of image files, decoded lazily (PIL, RGB).

    Attributes:
        root: folder the paths are relative to.
        paths: relative image paths, one per sample.
        labels: int64 array (N,) of class ids.
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "labels", _as_labels(self.labels))
        if len(self.paths) != len(self.labels):
            msg = f"FileSplit has {len(self.paths)} paths but {len(self.labels)} labels"
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        """Absolute path of sample ``i``."""
        return self.root / self.paths[i]

    def where(self, i: int) -> str:
        """Where sample ``i`` is stored, for messages (here: its path)."""
        return str(self.path(i))

    def image(self, i: int) -> Any:
        """Sample ``i`` decoded as an RGB ``PIL.Image``.

        Raises:
            SampleError: the bytes cannot be decoded; the message starts with ``where(i)``.
        """
        source = self.path(i)
        try:
            with Image.open(source) as img:
                return img.convert("RGB")
        except _DECODE_ERRORS as err:
            # Pillow's own text would end in the repr of an in-memory file object: name the format problem only.
            detail = "cannot identify image file" if isinstance(err, UnidentifiedImageError) else str(err)
            msg = f"{self.where(i)}: {detail}"
            raise SampleError(msg) from err

    def subset(self, indices: np.ndarray) -> FileSplit:
        """The split restricted to ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return FileSplit(self.root, tuple(self.paths[i] for i in idx), self.labels[idx])


class Split(Protocol):
    """Anything with per-sample ``labels`` and a length (TensorSplit, FileSplit, shard splits)."""

    labels: np.ndarray

    def __len__(self) -> int: ...


@dataclass(frozen=True, eq=False)
class DataBundle:
    """Train / val (= meta) / test splits of one dataset with what is needed to load them.

    Attributes:
        train, val, test: the splits; ``val`` is the meta set (SPEC §3).
        num_classes: C.
        class_names: C names.
        augment: train augmentation family, "cifar" or "imagenet" (also selects the eval transform).
        mean, std: per-channel normalisation in [0, 1] pixel units.
        info: provenance (chosen indices, overlaps, generator settings); JSON-serialisable.
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    augment: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.class_names) != self.num_classes:
            msg = f"{len(self.class_names)} class names for {self.num_classes} classes"
            raise ValueError(msg)
        if self.augment not in ("cifar", "imagenet"):
            msg = f"DataBundle.augment must be 'cifar' or 'imagenet', got '{self.augment}'"
            raise ValueError(msg)

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per class, int64 (C,)."""
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)


@dataclass(frozen=True)
class LoaderSpec:
    """How a loader should produce batches.

    Attributes:
        batch_size: images per batch.
        device: where batches are delivered.
        seed: seeds the order and the augmentation (batches are a pure function of (seed, epoch)).
        workers: worker processes/threads (naive loader, decoding).
        augment: "cifar" | "imagenet" | "none" (none: the eval transform of ``eval_augment``).
        mean, std: per-channel normalisation.
        crop_size: output side for ImageNet-style transforms (ignored by CIFAR-style ones).
        train: True: seeded order from ``sampling.epoch_order``, augmentation, last partial batch dropped;
            False: file order, eval transform, every sample once.
        order: ``sampling.epoch_order`` kind (uniform | class_aware | sqrt | progressive).
        eval_augment: the family whose eval transform applies ("cifar" | "imagenet"); "auto" = ``augment``, or
            "cifar" when ``augment`` is "none".
        rank, world_size: data-parallel shard of the epoch order.
        num_epochs: total epochs (progressive sampling needs it).
        recipe: stage-1 ops added after the crop and flip of a training batch (AutoAugment, RandAugment,
            ColorJitter, Cutout; ``policies.Recipe``); the default adds none. Ignored with ``augment="none"``
            and in eval mode.
        num_samples: training epoch length L in samples (default: the split size); class-balanced orders of
            stage 2 set it (``sampling.epoch_order``'s ``num_samples``).
        per_visit: samples per class visit of the ``class_aware`` order (k = 4 in cRT).
    """

    batch_size: int
    device: str | torch.device = "cpu"
    seed: int = 0
    workers: int = 0
    augment: str = "none"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_size: int = 224
    train: bool = True
    order: str = "uniform"
    eval_augment: str = "auto"
    rank: int = 0
    world_size: int = 1
    num_epochs: int = 1
    recipe: Recipe = Recipe()
    num_samples: int | None = None
    per_visit: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            msg = f"LoaderSpec.recipe must be a policies.Recipe, got {type(self.recipe).__name__}"
            raise TypeError(msg)
        if self.batch_size < 1:
            msg = f"LoaderSpec.batch_size must be >= 1, got {self.batch_size}"
            raise ValueError(msg)
        if self.augment not in ("cifar", "imagenet", "none"):
            msg = f"LoaderSpec.augment must be cifar | imagenet | none, got '{self.augment}'"
            raise ValueError(msg)
        if self.eval_augment == "auto":
            object.__setattr__(self, "eval_augment", "cifar" if self.augment == "none" else self.augment)
        if self.eval_augment not in ("cifar", "imagenet"):
            msg = f"LoaderSpec.eval_augment must be cifar | imagenet, got '{self.eval_augment}'"
            raise ValueError(msg)

    @property
    def train_recipe(self) -> Recipe | None:
        """The recipe a training batch gets, or None (eval mode, no augmentation, or an inactive recipe)."""
        if self.train and self.augment != "none" and self.recipe.active:
            return self.recipe
        return None

    @property
    def family(self) -> str:
        """The transform family ("cifar" | "imagenet") deciding image geometry."""
        return self.eval_augment if self.augment == "none" else self.augment

    @classmethod
    def for_bundle(cls, bundle: DataBundle, batch_size: int, **kwargs: Any) -> LoaderSpec:
        """A spec using the bundle's augmentation family and normalisation; ``kwargs`` override fields."""
        base = {
            "augment": bundle.augment,
            "eval_augment": bundle.augment,
            "mean": bundle.mean,
            "std": bundle.std,
        }
        base.update(kwargs)
        return cls(batch_size=batch_size, **base)


class Loader(Protocol):
    """What a LOADERS constructor returns."""

    def batches(self, epoch: int) -> Iterator[Batch]:
        """Yields ``(x, y)``: x float32 (B, 3, H, W) normalised on the device, y int64 (B,)."""
        ...

    def __len__(self) -> int: ...
