"""Training and eval loaders ``resident`` (pixels held on the device, batched augmentation) and ``naive`` (DataLoader)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dnet_fast import sampling
from dnet_fast.data.base import LOADERS, Batch, DataBundle, FileSplit, LoaderSpec, SampleError, TensorSplit
from dnet_fast.data.transforms import (
    batch_generator,
    draw_params,
    eval_size,
    eval_transform,
    normalize,
    pil_decode_resident,
    pil_eval,
    pil_train,
    train_transform,
)
from dnet_fast.info import usable_cpus

__all__ = [
    "RESIDENT_SHARE",
    "ImageDataset",
    "NaiveLoader",
    "ResidentLoader",
    "epoch_indices",
    "eval_batches",
    "make_loader",
    "num_batches",
    "open_image",
    "require_module",
    "resident_bytes",
    "resolve_loader",
    "loader_workers",
    "to_device_batch",
]


def epoch_indices(labels: np.ndarray, spec: LoaderSpec, epoch: int) -> np.ndarray:
    """This rank's sample order for ``epoch`` (training) or file order (eval), int64."""
    if not spec.train:
        return np.arange(len(labels), dtype=np.int64)
    return sampling.epoch_order(
        labels,
        spec.order,
        seed=spec.seed,
        epoch=epoch,
        rank=spec.rank,
        world_size=spec.world_size,
        num_epochs=spec.num_epochs,
        num_samples=spec.num_samples,
        per_visit=spec.per_visit,
    )


def num_batches(num_samples: int, spec: LoaderSpec) -> int:
    """Batches per epoch: every sample once (eval), or this rank's share with the last partial batch dropped.

    ``num_samples`` is the split size; a training spec with its own ``num_samples`` (epoch length) uses that.
    """
    if not spec.train:
        return -(-num_samples // spec.batch_size)  # every sample once, last batch partial
    if spec.num_samples is not None:
        num_samples = spec.num_samples
    per_rank = -(-num_samples // spec.world_size)  # epoch_order gives every rank ceil(N / world_size)
    return per_rank // spec.batch_size  # drop the last partial batch: static shapes


def to_device_batch(images: torch.Tensor, labels: torch.Tensor, spec: LoaderSpec) -> Batch:
    """A decoded batch moved to ``spec.device`` and normalised there.

    uint8 (B, h, w, 3) images go through the shared ``transforms.normalize``, so every loader's eval output is the
    same function of the pixels; float32 (B, 3, h, w) images, already normalised by a decoder's fused op, only move.
    """
    device = torch.device(spec.device)
    x = images.to(device, non_blocking=True)
    if x.dtype != torch.float32:
        x = normalize(x, spec.mean, spec.std)  # (B, 3, h, w)
    return x, labels.to(device, dtype=torch.int64, non_blocking=True)


def require_module(name: str, hint: str) -> None:
    """Imports the optional dependency ``name`` of a loader, or raises ImportError with ``hint`` (how to get it)."""
    try:
        importlib.import_module(name)
    except ImportError as err:
        raise ImportError(hint) from err


def open_image(split: TensorSplit | FileSplit, i: int) -> Image.Image:
    """Sample ``i`` of a split as an RGB PIL image (a decode error names the file, or the shard and sample)."""
    if isinstance(split, TensorSplit):
        return Image.fromarray(split.images[i].numpy(), "RGB")
    return split.image(i)


# ----------------------------------------------------------------------------------------------------------
# resident: the decoded uint8 set lives on the device; every batch is one gather + batched augmentation.


def _decode_files(split: FileSplit, spec: LoaderSpec) -> torch.Tensor:
    """Decodes every file once to the R×R resident size (ImageNet family) or as is (CIFAR family)."""

    def decode(i: int) -> np.ndarray:
        img = open_image(split, i)
        if spec.family == "imagenet":
            img = pil_decode_resident(img, spec.crop_size)
        return np.asarray(img, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=max(spec.workers, 1)) as pool:
        arrays = list(pool.map(decode, range(len(split))))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        msg = f"resident loader needs equally sized images, got {sorted(shapes)[:4]}; use the imagenet family"
        raise ValueError(msg)
    return torch.from_numpy(np.stack(arrays))  # (N, H, W, 3)


class ResidentLoader:
    """Holds the split as a uint8 (N, H, W, 3) tensor on ``spec.device`` and augments whole batches there.

    Args:
        split: a TensorSplit (used as is) or a FileSplit (decoded once at construction).
        spec: batch size, device, seed, augmentation and order.
    """

    def __init__(self, split: TensorSplit | FileSplit, spec: LoaderSpec) -> None:
        if not isinstance(split, TensorSplit | FileSplit):
            msg = f"resident loader takes a TensorSplit or FileSplit, got {type(split).__name__}"
            raise TypeError(msg)
        self.spec = spec
        self.device = torch.device(spec.device)
        pixels = split.images if isinstance(split, TensorSplit) else _decode_files(split, spec)
        self.images = pixels.to(self.device)  # (N, H, W, 3) uint8
        self.labels_np = split.labels
        self.labels = torch.from_numpy(split.labels).to(self.device)  # (N,) int64

    def __len__(self) -> int:
        return num_batches(len(self.labels_np), self.spec)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch index ``start`` on (mid-epoch resume); see ``Loader``."""
        spec = self.spec
        order = torch.from_numpy(epoch_indices(self.labels_np, spec, epoch)).to(self.device)
        for b in range(start, len(self)):
            idx = order[b * spec.batch_size : (b + 1) * spec.batch_size]  # (B,)
            yield self._transform(self.images[idx], epoch, b), self.labels[idx]

    def _transform(self, pixels: torch.Tensor, epoch: int, b: int) -> torch.Tensor:
        spec = self.spec
        if not spec.train or spec.augment == "none":
            return eval_transform(pixels, spec.eval_augment, spec.crop_size, spec.mean, spec.std)
        gen = batch_generator(spec.seed, epoch, b, stream=spec.rank)
        params = draw_params(spec.augment, gen, len(pixels), spec.train_recipe)
        return train_transform(
            pixels, spec.augment, params, spec.crop_size, spec.mean, spec.std, spec.train_recipe
        )


# ----------------------------------------------------------------------------------------------------------
# naive: torch DataLoader over a map-style dataset, per-image PIL decode and transforms in the workers.


class ImageDataset(Dataset):
    """Map-style dataset whose keys are ``(index, epoch, batch, row)``; returns (uint8 (h, w, 3), label).

    The batch and row select the image's random numbers from the batch's ``draw_params``, so an image gets exactly
    the augmentation the resident loader would give it.
    """

    def __init__(self, split: TensorSplit | FileSplit, spec: LoaderSpec) -> None:
        self.split, self.spec = split, spec
        self._cached: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
        i, epoch, b, row = key
        spec, img = self.spec, open_image(self.split, i)
        if not spec.train or spec.augment == "none":
            pixels = pil_eval(img, spec.eval_augment, spec.crop_size)
        else:
            params = self._params(epoch, b)
            pixels = pil_train(img, spec.augment, params, row, spec.crop_size, spec.train_recipe)
        return pixels, int(self.split.labels[i])

    def _params(self, epoch: int, b: int) -> dict[str, torch.Tensor]:
        # Consecutive keys share a batch: draw its parameters once per batch per worker.
        if self._cached is None or self._cached[0] != (epoch, b):
            gen = batch_generator(self.spec.seed, epoch, b, stream=self.spec.rank)
            params = draw_params(self.spec.augment, gen, self.spec.batch_size, self.spec.train_recipe)
            self._cached = ((epoch, b), params)
        return self._cached[1]


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([p for p, _ in items])  # (B, h, w, 3) uint8
    return pixels, torch.tensor([y for _, y in items], dtype=torch.int64)


class _EpochKeys:
    """Batch sampler of ``(index, epoch, batch, row)`` keys for one epoch; the epoch is set before iterating."""

    def __init__(self, labels: np.ndarray, spec: LoaderSpec) -> None:
        self.labels, self.spec = labels, spec
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.spec) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        bs, order = self.spec.batch_size, epoch_indices(self.labels, self.spec, self.epoch).tolist()
        for b in range(self.start, num_batches(len(self.labels), self.spec)):
            yield [(i, self.epoch, b, r) for r, i in enumerate(order[b * bs : (b + 1) * bs])]


class NaiveLoader:
    """A torch ``DataLoader`` with ``spec.workers`` processes; order from ``sampling.epoch_order``.

    The workers persist across epochs and start from a fork server: forking the training process directly can
    deadlock a worker when other libraries (DALI, FFCV, OpenMP) have threads holding locks at fork time.

    Args:
        split: a TensorSplit or FileSplit.
        spec: batch size, device, seed, workers, augmentation and order.
    """

    def __init__(self, split: TensorSplit | FileSplit, spec: LoaderSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dataset = ImageDataset(split, spec)
        self.labels_np = split.labels
        self._keys = _EpochKeys(split.labels, spec)
        workers = spec.workers > 0
        self._loader = DataLoader(
            self.dataset,
            batch_sampler=self._keys,
            num_workers=spec.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers,
            multiprocessing_context="forkserver" if workers else None,
        )

    def __len__(self) -> int:
        return num_batches(len(self.labels_np), self.spec)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch index ``start`` on (mid-epoch resume); see ``Loader``."""
        self._keys.epoch, self._keys.start = epoch, start
        try:
            for pixels, labels in self._loader:
                yield to_device_batch(pixels, labels, self.spec)
        except SampleError as err:
            text = str(err).rstrip()
            if "\n" not in text:
                raise
            # From a worker the error arrives with its whole traceback as the text: keep the line naming the sample.
            raise SampleError(text.rsplit("SampleError: ", 1)[-1]) from None


@LOADERS.register("resident")
def build_resident(split: TensorSplit | FileSplit, spec: LoaderSpec) -> ResidentLoader:
    """The resident loader (default for in-memory splits)."""
    return ResidentLoader(split, spec)


@LOADERS.register("naive")
def build_naive(split: TensorSplit | FileSplit, spec: LoaderSpec) -> NaiveLoader:
    """The naive DataLoader-based loader (the baseline and the fallback for file splits)."""
    return NaiveLoader(split, spec)


#: Share of the device's memory (host RAM on the CPU) the resident loader may fill with decoded images.
RESIDENT_SHARE = 0.25


def _importable(module: str) -> bool:
    """Whether an optional loader dependency imports (installed and working: ffcv needs OpenCV, for example)."""
    try:
        importlib.import_module(module)
    except Exception:  # a broken install (missing system library) counts as unavailable, whatever it raises
        return False
    return True


def _memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the host's physical RAM (0 where unknown)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def resident_bytes(split: FileSplit, spec: LoaderSpec) -> int:
    """Bytes the resident loader would hold for ``split``: N·R·R·3 (ImageNet family, R = the resident side)
    or N times the first image's H·W·3 (CIFAR family, stored as is)."""
    if len(split) == 0:
        return 0
    if spec.family == "imagenet":
        side = eval_size(spec.crop_size)
        return len(split) * side * side * 3
    with Image.open(split.path(0)) as img:
        w, h = img.size
    return len(split) * h * w * 3


def resolve_loader(name: str, bundle: DataBundle, spec: LoaderSpec) -> str:
    """The loader ``name`` stands for: itself, or for ``auto`` the fastest one available for ``bundle.train``.

    ``auto``: the dataset's own choice (``bundle.info["default_loader"]``) when it names one; ``resident`` for
    in-memory splits and for file splits whose decoded size (:func:`resident_bytes`) fits in ``RESIDENT_SHARE``
    of the device's memory (one decode at start, then no decoding at all); else ``ffcv`` when the split has a
    ``.beton`` and ffcv imports; else ``dali`` for converted shards when DALI imports; else ``naive``.
    The order is what ``benchmarks/bench_train_loaders.py`` measured inside training (RESULTS.md).
    """
    if name != "auto":
        return name
    named = bundle.info.get("default_loader")
    split = bundle.train
    if named:
        return str(named)
    if isinstance(split, TensorSplit):
        return "resident"
    if resident_bytes(split, spec) <= RESIDENT_SHARE * _memory_bytes(torch.device(spec.device)):
        return "resident"
    if getattr(split, "beton", None) and _importable("ffcv"):
        return "ffcv"
    if getattr(split, "tars", None) and _importable("nvidia.dali"):
        return "dali"
    return "naive"


def make_loader(name: str, split: Any, spec: LoaderSpec, bundle: DataBundle | None = None) -> Any:
    """Builds loader ``name`` (``auto``: :func:`resolve_loader` for ``bundle``) for ``split``."""
    if name == "auto":
        if bundle is None:
            msg = "loader 'auto' needs the bundle to choose"
            raise ValueError(msg)
        name = resolve_loader(name, bundle, spec)
    return LOADERS.get(name)(split, spec)


def eval_batches(
    split: TensorSplit | FileSplit,
    bundle: DataBundle,
    batch_size: int,
    device: str | torch.device,
    crop_size: int = 224,
    workers: int = 0,
) -> Iterator[Batch]:
    """Every sample of ``split`` once, in order, with the bundle's deterministic eval transform (last batch partial).

    In-memory splits are moved to the device one batch at a time; file splits are decoded by the naive loader.
    """
    spec = LoaderSpec.for_bundle(
        bundle, batch_size, device=device, train=False, augment="none", crop_size=crop_size, workers=workers
    )
    if isinstance(split, TensorSplit):
        yield from _tensor_eval(split, spec)
    else:
        yield from NaiveLoader(split, spec).batches(0)


def _tensor_eval(split: TensorSplit, spec: LoaderSpec) -> Iterator[Batch]:
    device = torch.device(spec.device)
    labels = torch.from_numpy(split.labels)
    for start in range(0, len(split), spec.batch_size):
        pixels = split.images[start : start + spec.batch_size].to(device)
        x = eval_transform(pixels, spec.eval_augment, spec.crop_size, spec.mean, spec.std)
        yield x, labels[start : start + spec.batch_size].to(device)


def loader_workers(requested: int, device: torch.device | str) -> int:
    """Loader workers/threads for ``data.workers`` (-1 = auto: what the training threads leave of the CPUs).

    Training on the CPU keeps ``torch.get_num_threads()`` cores busy; on CUDA one host thread feeds the GPU.
    More loader workers than the cores left over only contend with the step (FFCV with 2 workers beside 2 torch
    threads on a 2-core box ran 6x slower than with 1).
    """
    if requested >= 0:
        return requested
    training = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    return max(1, usable_cpus() - training)
