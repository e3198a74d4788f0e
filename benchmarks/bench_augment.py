"""The ``augment`` benchmark: the stage-1 recipes batched on tensors vs per image with PIL (images/s).

Each call augments one training batch the way a loader does: crop + flip + recipe + normalise. ``pil`` is the
naive loader's per-image path (``transforms.pil_train`` on PIL images, then the batched normalise), on the CPU
in this process; ``batched`` is the resident loader's ``transforms.train_transform`` on a uint8 batch on the
profile's device. Both draw the same parameters from ``batch_generator(seed, 0, call)``, so they do the same
work (the CIFAR outputs are even bit-identical). Points: the CIFAR recipe (AutoAugment + Cutout 16, 32-px
images, batch 128) and the ImageNet-LT recipe (ColorJitter 0.4 + RandAugment rand-n2-m10-mstd0.5 after a
224-px RandomResizedCrop of 256-px images, batch 64); ``--quick``: 16 px / 32 → 24 px, batch 16 / 8.

Run: ``python -m benchmarks [--quick] --only augment [--threads 1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio

__all__ = ["AugmentBenchmark", "textured_batch"]

SEED = 0
CIFAR_RECIPE = {"autoaugment": "cifar10", "cutout": 16}
IMAGENET_RECIPE = {"color_jitter": 0.4, "randaugment": "rand-n2-m10-mstd0.5"}
FULL = [
    {"name": "cifar", "family": "cifar", "side": 32, "crop": 32, "batch": 128, "recipe": CIFAR_RECIPE},
    {
        "name": "imagenet",
        "family": "imagenet",
        "side": 256,
        "crop": 224,
        "batch": 64,
        "recipe": IMAGENET_RECIPE,
    },
]
QUICK = [
    {"name": "cifar_quick", "family": "cifar", "side": 16, "crop": 16, "batch": 16, "recipe": CIFAR_RECIPE},
    {
        "name": "imagenet_quick",
        "family": "imagenet",
        "side": 32,
        "crop": 24,
        "batch": 8,
        "recipe": IMAGENET_RECIPE,
    },
]


def textured_batch(n: int, side: int, seed: int = SEED) -> torch.Tensor:
    """uint8 (n, side, side, 3) smooth noise (bicubic-upsampled), which histograms and resamples like photos."""
    rng = np.random.Generator(np.random.PCG64(seed))
    small = rng.integers(0, 256, size=(n, max(2, side // 8), max(2, side // 8), 3), dtype=np.uint8)
    big = [np.asarray(Image.fromarray(s).resize((side, side), Image.Resampling.BICUBIC)) for s in small]
    return torch.from_numpy(np.stack(big))


@BENCHMARKS.register("augment")
class AugmentBenchmark(Benchmark):
    """One augmented training batch per call; images/s is the column that matters."""

    description = (
        "stage-1 recipes img/s: batched tensor ops vs per-image PIL (crop + flip + recipe + normalise)"
    )
    baseline = "pil"
    unit_name = "img"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """The CIFAR and the ImageNet-LT recipe (``--quick``: tiny images)."""
        points = QUICK if profile.quick else FULL
        return [{**p, **profile.extra, "device": profile.device} for p in points]

    def variants(self, params: dict[str, Any]) -> list[str]:  # noqa: ARG002 - same variants everywhere
        """PIL first."""
        return ["pil", "batched"]

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002
        """The batched path's speed-up over PIL (target ≥ 5×)."""
        return [Ratio("batched speed-up over PIL", "pil", "batched", 5.0)]

    def setup(self, params: dict[str, Any]) -> None:
        """Builds the images (tensor and PIL), the recipe and the normalisation."""
        from dnet_fast.data.base import IMAGENET_MEAN, IMAGENET_STD
        from dnet_fast.data.policies import Recipe

        self.params, self.notes = params, {}
        self.recipe = Recipe(**params["recipe"])
        self.images = textured_batch(params["batch"], params["side"])  # (B, side, side, 3) uint8
        self.pils = [Image.fromarray(a.numpy(), "RGB") for a in self.images]
        self.norm = (IMAGENET_MEAN, IMAGENET_STD)
        self.units_per_call = params["batch"]
        self._call = 0

    def _draw(self) -> dict[str, torch.Tensor]:
        from dnet_fast.data.transforms import batch_generator, draw_params

        self._call += 1  # a new batch each call: the ops drawn vary as in training
        gen = batch_generator(SEED, 0, self._call)
        return draw_params(self.params["family"], gen, self.params["batch"], self.recipe)

    def prepare(self, variant: str) -> Callable[[], object]:
        """The callable augmenting one batch with ``variant``."""
        from dnet_fast.data.transforms import normalize, pil_train, train_transform

        p, recipe, (mean, std) = self.params, self.recipe, self.norm
        if variant == "pil":

            def run_pil() -> torch.Tensor:
                params = self._draw()
                rows = [
                    pil_train(img, p["family"], params, i, p["crop"], recipe)
                    for i, img in enumerate(self.pils)
                ]
                return normalize(torch.stack(rows), mean, std)

            return run_pil
        images = self.images.to(p["device"])

        def run_batched() -> torch.Tensor:
            return train_transform(images, p["family"], self._draw(), p["crop"], mean, std, recipe)

        return run_batched

    def teardown(self) -> None:
        """Frees the images."""
        self.images, self.pils = torch.empty(0), []
