"""The ``ffcv`` loader: FFCV decodes a converted ``.beton``; the order comes from dnet-fast's sampling engine."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import torch

from dnet_fast.data.augment import apply_recipe
from dnet_fast.data.base import LOADERS, Batch, LoaderSpec
from dnet_fast.data.loaders import epoch_indices, num_batches, require_module, to_device_batch
from dnet_fast.data.shards import ShardSplit
from dnet_fast.data.transforms import CIFAR_PAD, RRC_RATIO, RRC_SCALE, batch_generator, draw_params, eval_size

__all__ = ["SYSTEM_PACKAGES", "FfcvLoader", "build_ffcv", "ffcv_hint", "missing_system_packages"]


@cache
def _engine_order_class() -> type:
    """A TraversalOrder whose ``sample_order(epoch)`` is the engine's order (built on first use: ffcv is optional)."""
    from ffcv.traversal_order.base import TraversalOrder

    class EngineOrder(TraversalOrder):
        """Epoch orders from ``sampling.epoch_order`` (FFCV has no weighted sampler: libffcv/ffcv #211, #301).

        FFCV's Loader accepts a TraversalOrder *instance* and calls it with the loader, so the instance is
        configured first and ``__call__`` binds it.
        """

        def __init__(self, owner: FfcvLoader) -> None:  # noqa: D107 - deliberately skips TraversalOrder.__init__
            self.owner = owner

        def __call__(self, loader: Any) -> EngineOrder:
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.owner.sample_order(epoch)

    return EngineOrder


def _normalizes_inside(spec: LoaderSpec, device: torch.device) -> bool:
    """Training batches on the CPU are normalised by FFCV's fused lookup-table op in its worker threads (a
    separate torch pass costs as much as decoding); eval batches use the shared torch ``normalize`` so that
    they equal the other loaders' bit for bit; on CUDA uint8 is moved and normalised on the GPU. A training
    recipe needs the uint8 pixels, so it also normalises in torch after its ops."""
    return spec.train and spec.augment != "none" and device.type == "cpu" and spec.train_recipe is None


def _image_pipeline(spec: LoaderSpec, device: torch.device) -> list[Any]:
    """uint8 (B, H, W, 3) out, or normalised float32 (B, 3, H, W) channels_last when ``_normalizes_inside``.

    Every numpy op precedes ToTensor (the numpy→torch→numpy hang, PERFORMANCE §6).
    """
    from ffcv.fields.rgb_image import (
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
        SimpleRGBImageDecoder,
    )
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, RandomTranslate, ToTensor, ToTorchImage

    crop = spec.crop_size
    augment = spec.augment if spec.train else "none"
    tail: list[Any] = [ToTensor()]
    if _normalizes_inside(spec, device):
        mean, std = np.asarray(spec.mean) * 255, np.asarray(spec.std) * 255
        tail = [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=True)]
    if augment == "imagenet":
        decoder = RandomResizedCropRGBImageDecoder((crop, crop), scale=RRC_SCALE, ratio=RRC_RATIO)
        return [decoder, RandomHorizontalFlip(), *tail]
    if augment == "cifar":
        return [SimpleRGBImageDecoder(), RandomTranslate(padding=CIFAR_PAD), RandomHorizontalFlip(), *tail]
    if spec.eval_augment == "imagenet":
        # Centre square of side crop/R · shorter side, resized to crop: "resize shorter to R, centre-crop crop".
        # The epsilon keeps int(ratio · R) == crop despite float rounding.
        return [CenterCropRGBImageDecoder((crop, crop), ratio=crop / eval_size(crop) + 1e-9), ToTensor()]
    return [SimpleRGBImageDecoder(), ToTensor()]


class FfcvLoader:
    """Batches decoded by FFCV from ``split.beton``, in the order of ``sampling.epoch_order``.

    Normalisation runs after the loader with the shared ``transforms.normalize`` (on ``spec.device``), so eval
    outputs equal the other loaders' wherever the decoded pixels do. FFCV crops and flips (with its own
    randomness); a training ``spec.recipe`` then runs as the batched tensor ops of ``augment`` on the device,
    drawn from ``transforms.batch_generator`` for (seed, epoch, batch) like the resident loader's.

    Args:
        split: a ShardSplit of a directory converted with FFCV output.
        spec: batch size, device, seed, workers (FFCV threads), augmentation and order.
    """

    def __init__(self, split: ShardSplit, spec: LoaderSpec) -> None:
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        if not isinstance(split, ShardSplit) or not split.beton:
            msg = "the ffcv loader needs a split of a converted directory with .beton files (data.dataset=shards)"
            raise ValueError(msg)
        self.split, self.spec = split, spec
        self.device = torch.device(spec.device)
        self._epoch, self._start = 0, 0
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        self._loader = Loader(
            split.beton,
            batch_size=spec.batch_size,
            num_workers=max(1, spec.workers),
            order=_engine_order_class()(self),
            indices=np.asarray(split.rows, dtype=np.int64),
            pipelines={
                "image": _image_pipeline(spec, self.device) + to_device,
                "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device],
            },
            drop_last=spec.train,
            seed=spec.seed,
            batches_ahead=2,
        )

    def sample_order(self, epoch: int) -> np.ndarray:
        """Beton sample ids of ``epoch`` from batch ``start`` on (the traversal order FFCV asks for)."""
        order = epoch_indices(self.split.labels, self.spec, epoch)[self._start * self.spec.batch_size :]
        return np.asarray(self.split.rows, dtype=np.int64)[order]

    def __len__(self) -> int:
        return num_batches(len(self.split), self.spec)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch index ``start`` on; see ``Loader``."""
        self._start = start
        self._loader.next_epoch = epoch  # FFCV passes this to sample_order
        for b, (images, labels) in enumerate(self._loader, start):
            # Batches normalised inside FFCV are its ring buffers: valid until it has produced two more batches.
            x = self._augment(images, epoch, b)
            yield to_device_batch(x, labels, self.spec)  # x: (B, 3, h, w) float32

    def _augment(self, images: torch.Tensor, epoch: int, b: int) -> torch.Tensor:
        """The training recipe on a decoded uint8 (B, h, w, 3) batch, on ``spec.device`` (copies the ring buffer)."""
        spec, recipe = self.spec, self.spec.train_recipe
        if recipe is None:
            return images
        gen = batch_generator(spec.seed, epoch, b, stream=spec.rank)
        params = draw_params(spec.augment, gen, len(images), recipe)  # the crop keys go unused: FFCV cropped
        return apply_recipe(images.to(self.device, non_blocking=True), recipe, params)


SYSTEM_PACKAGES = {"pkg-config": "pkg-config", "opencv4": "libopencv-dev", "libturbojpeg": "libturbojpeg0-dev"}


def missing_system_packages() -> list[str]:
    """Debian/Ubuntu packages ffcv's build needs that this machine lacks (pkg-config cannot find their .pc)."""
    pkg_config = shutil.which("pkg-config")
    if pkg_config is None:
        return list(SYSTEM_PACKAGES.values())
    missing = []
    for pc, package in SYSTEM_PACKAGES.items():
        if pc == "pkg-config":
            continue
        done = subprocess.run([pkg_config, "--exists", pc], capture_output=True, timeout=10, check=False)
        if done.returncode != 0:
            missing.append(package)
    return missing


def ffcv_hint() -> str:
    """How to get a working ffcv here: the extra, its system packages, and which of them are missing."""
    missing = missing_system_packages()
    state = f"missing here: {' '.join(missing)}" if missing else "all present here"
    return (
        "the ffcv loader needs ffcv: pip install 'dnet-fast[ffcv]' (make ffcv in a checkout) builds it against "
        f"pkg-config, OpenCV 4 and libjpeg-turbo (Debian/Ubuntu: apt-get install {' '.join(SYSTEM_PACKAGES.values())}"
        f"; {state}); or choose --loader resident | dali | naive"
    )


@LOADERS.register("ffcv")
def build_ffcv(split: ShardSplit, spec: LoaderSpec) -> FfcvLoader:
    """The FFCV loader (needs the ``ffcv`` extra and a directory converted with FFCV output)."""
    try:
        require_module("ffcv", "ffcv does not import")
    except ImportError as err:
        raise ImportError(f"{ffcv_hint()} [{err.__cause__}]") from err.__cause__
    return FfcvLoader(split, spec)
