"""CIFAR-LT conversion: the cifar*_lt bundle stored losslessly, read back through the shards dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dnet_fast.data.shards  # noqa: F401  (registers the shards dataset)
from dnet_fast.config import DataConfig
from dnet_fast.data.base import DATASETS, LoaderSpec
from dnet_fast.data.loaders import ResidentLoader
from dnet_fast.data.shards import decode_split
from tests.fake_cifar import cifar_rows, write_cifar10

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    """A CIFAR-10 python folder with 30 random images per class (5 train batches) and 4 test images per class."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.Generator(np.random.PCG64(0))
    labels = rng.permutation(np.repeat(np.arange(10), 30)).reshape(5, 60)
    train = [(cifar_rows(rng, 60), labels[b].tolist()) for b in range(5)]
    write_cifar10(root, train, (cifar_rows(rng, 40), np.repeat(np.arange(10), 4).tolist()))
    return root


def test_cifar_lt_shards_equal_the_bundle(fake_cifar10, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from convert_cifar_lt import main

    out = tmp_path / "shards"
    args = [
        "--root",
        str(fake_cifar10),
        "--classes",
        "10",
        "--imbalance",
        "10",
        "--val-per-class",
        "2",
        "--out",
        str(out),
        "--formats",
        "wds",
        "--workers",
        "0",
        "--no-progress",
        "--shard-size",
        "64",
    ]
    assert main(args) == 0
    cfg = DataConfig(dataset="cifar10_lt", root=str(fake_cifar10), imbalance=10, val_per_class=2)
    want = DATASETS.get("cifar10_lt")(cfg, 0)
    got = DATASETS.get("shards")(DataConfig(dataset="shards", root=str(out)), 0)
    assert (got.augment, got.mean, got.std, got.class_names) == (
        want.augment,
        want.mean,
        want.std,
        want.class_names,
    )
    for split in ("train", "val", "test"):  # val is the stored meta set itself, not a redraw
        g, w = getattr(got, split), getattr(want, split)
        assert g.labels.tolist() == w.labels.tolist()
        assert torch.equal(decode_split(g).images, w.images)  # PNG: lossless
    spec = LoaderSpec.for_bundle(want, 16, seed=1, train=True, augment="cifar")
    a = next(ResidentLoader(got.train, spec).batches(2))
    b = next(ResidentLoader(want.train, spec).batches(2))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
