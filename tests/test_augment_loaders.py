"""Recipes through the FFCV and DALI loaders: a small converted shard directory gives finite batches of the right shape.

FFCV runs the batched tensor recipe after its decoder; DALI runs the same policies as DALI ops
(``dali_recipe``). Both are optional dependencies: the tests skip without them. One loader per test, since FFCV
JIT-compiles a pipeline per loader.
"""

from __future__ import annotations

import pytest
import torch

import dnet_fast.data.dali_loader
import dnet_fast.data.ffcv_loader
import dnet_fast.data.shards  # noqa: F401  (registers the shards dataset and the ffcv/dali loaders)
from dnet_fast.data.augment import apply_recipe
from dnet_fast.data.base import IMAGENET_MEAN, IMAGENET_STD, LOADERS, LoaderSpec
from dnet_fast.data.policies import Recipe
from dnet_fast.data.shards import open_split
from dnet_fast.data.transforms import batch_generator, draw_params
from tests.places_tree import converted_tree

CROP = 32
CIFAR = Recipe(autoaugment="cifar10", cutout=16)
IMAGENET = Recipe(color_jitter=0.4, randaugment="rand-n2-m10-mstd0.5")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The miniature Places-LT tree converted losslessly (PNG shards, raw .beton when ffcv is installed)."""
    return converted_tree(tmp_path_factory.mktemp("places"), max_side=48)


def _spec(augment: str, recipe: Recipe) -> LoaderSpec:
    return LoaderSpec(
        batch_size=8,
        seed=3,
        workers=1,
        augment=augment,
        crop_size=CROP,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        recipe=recipe,
    )


def _batches(name: str, split, spec: LoaderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*LOADERS.get(name)(split, spec).batches(1), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _needs(name: str) -> None:
    pytest.importorskip("ffcv" if name == "ffcv" else "nvidia.dali")


def test_dali_imagenet_recipe_batches(shards):
    _needs("dali")
    train = open_split(shards, "train")
    x, y = _batches("dali", train, _spec("imagenet", IMAGENET))
    assert x.shape == (len(train) // 8 * 8, 3, CROP, CROP)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert len(y) == len(x)


def test_dali_cifar_recipe_batches(shards):
    _needs("dali")
    train = open_split(shards, "train")
    x, _ = _batches("dali", train, _spec("cifar", CIFAR))
    assert x.shape[:2] == (len(train) // 8 * 8, 3)
    assert torch.isfinite(x).all()
    # Cutout leaves a constant square in some images: look for a 16×16 block of one value.
    blocks = x[:, 0].unfold(1, 16, 1).unfold(2, 16, 1).flatten(-2)
    assert bool((blocks.std(-1) == 0).any())


def test_ffcv_imagenet_recipe_batches(shards, monkeypatch):
    """FFCV decodes and crops; the recipe runs as the tensor ops with the batch_generator draws of each batch."""
    _needs("ffcv")
    seen = []

    def recording(images, recipe, params):
        seen.append(params)
        return apply_recipe(images, recipe, params)

    monkeypatch.setattr(dnet_fast.data.ffcv_loader, "apply_recipe", recording)
    train = open_split(shards, "train")
    recipe = Recipe(color_jitter=0.4, cutout=12)
    spec = _spec("imagenet", recipe)
    x, _ = _batches("ffcv", train, spec)
    assert x.shape == (len(train) // 8 * 8, 3, CROP, CROP)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    blocks = x[:, 0].unfold(1, 12, 1).unfold(2, 12, 1).flatten(-2)
    assert bool((blocks.std(-1) == 0).any())  # the Cutout squares
    assert len(seen) == len(x) // 8
    for b, params in enumerate(seen):  # epoch 1, batch b: the resident loader's draws for the same batch
        want = draw_params("imagenet", batch_generator(3, 1, b), 8, recipe)
        assert all(torch.equal(params[k], want[k]) for k in want)
