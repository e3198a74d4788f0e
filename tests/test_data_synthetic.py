"""The embedded synthetic long-tailed dataset: profile, determinism, speed, learnability proxies."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dnet_fast.config import DataConfig
from dnet_fast.data import DATASETS, TensorSplit
from dnet_fast.data.synthetic import DIFFICULTY_LEVELS, design_classes, exponential_counts


@pytest.fixture(scope="module")
def bundle():
    return DATASETS.get("synthetic")(DataConfig(), 0)


def test_default_profile_and_splits(bundle):
    counts = bundle.class_counts
    assert counts.tolist() == [200, 119, 71, 43, 25, 15, 9, 5, 3, 2]  # ⌊200·100^(−c/9)⌋
    assert bundle.num_classes == 10
    assert len(bundle.class_names) == 10
    for split, per_class in ((bundle.val, 20), (bundle.test, 50)):
        assert isinstance(split, TensorSplit)
        assert np.bincount(split.labels).tolist() == [per_class] * 10
    assert bundle.train.images.shape == (int(counts.sum()), 16, 16, 3)
    assert bundle.train.images.dtype == torch.uint8
    assert bundle.augment == "cifar"
    assert bundle.info["counts"] == counts.tolist()


def test_exponential_counts_floor_at_one():
    assert exponential_counts(10, 5, 1000.0).tolist() == [10, 1, 1, 1, 1]
    assert exponential_counts(50, 3, 1.0).tolist() == [50, 50, 50]


def test_same_seed_same_pixels_other_seed_differs(bundle):
    again = DATASETS.get("synthetic")(DataConfig(), 0)
    other = DATASETS.get("synthetic")(DataConfig(), 1)
    for a, b in ((bundle.train, again.train), (bundle.val, again.val), (bundle.test, again.test)):
        assert torch.equal(a.images, b.images)
    assert not torch.equal(bundle.train.images, other.train.images)
    assert bundle.info == again.info


def test_test_set_independent_of_train_size():
    # Separate RNG streams: changing the train profile leaves val/test pixels alone.
    a = DATASETS.get("synthetic")(DataConfig(max_count=50), 3)
    b = DATASETS.get("synthetic")(DataConfig(max_count=80), 3)
    assert torch.equal(a.test.images, b.test.images)


def test_generation_is_fast():
    start = time.perf_counter()
    DATASETS.get("synthetic")(DataConfig(), 7)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_classes", [2, 5, 10, 37])
def test_difficulty_not_monotone_in_frequency(seed, num_classes):
    level = design_classes(num_classes, seed).level
    third = max(num_classes // 3, 1)
    assert (level[:third] == DIFFICULTY_LEVELS.index("hard")).any()  # a hard head class
    assert (level[-third:] == DIFFICULTY_LEVELS.index("easy")).any()  # an easy tail class


def test_confusers_are_other_classes_for_non_easy():
    d = design_classes(10, 0)
    hard = d.level > 0
    assert (d.confuser[hard] != np.arange(10)[hard]).all()
    assert (d.confuser[~hard] == np.arange(10)[~hard]).all()


def _ncm_per_class(bundle) -> np.ndarray:
    x = bundle.train.images.reshape(len(bundle.train), -1).double()
    y = torch.from_numpy(bundle.train.labels)
    means = torch.stack([x[y == c].mean(0) for c in range(bundle.num_classes)])  # (C, D)
    xt = bundle.test.images.reshape(len(bundle.test), -1).double()
    pred = torch.cdist(xt, means).argmin(1).numpy()
    yt = bundle.test.labels
    return np.array([(pred[yt == c] == c).mean() for c in range(bundle.num_classes)])


def test_pixels_are_learnable_but_not_trivial(bundle):
    acc = _ncm_per_class(bundle)
    chance = 1.0 / bundle.num_classes
    assert 2 * chance < acc.mean() < 0.95
    assert acc.min() < 0.9  # some class is genuinely hard


def test_small_images_and_many_classes():
    b = DATASETS.get("synthetic")(DataConfig(num_classes=5, max_count=40, imbalance=10, image_size=8), 0)
    assert b.train.images.shape[1:] == (8, 8, 3)
    assert b.class_counts.tolist() == [40, 22, 12, 7, 4]
