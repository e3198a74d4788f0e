"""CIFAR-LT creation: the golden rows of SPEC §8 and an end-to-end build from fake CIFAR pickles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dnet_fast.config import DataConfig
from dnet_fast.data import DATASETS
from dnet_fast.data.cifar_lt import lt_counts, official_counts, select_official, select_standard
from dnet_fast.data.groups import group_sizes
from tests.fake_cifar import cifar_rows, write_cifar10, write_cifar100

# ρ: (standard total, head, tail, many, med, few), (official total, head, tail, many, med, few), overlap
GOLDEN_C100 = {
    200: ((9502, 500, 2, 30, 31, 39), (9022, 475, 2, 29, 31, 40), 25),
    100: ((10847, 500, 5, 35, 35, 30), (10302, 475, 4, 34, 35, 31), 27),
    50: ((12608, 500, 10, 41, 41, 18), (11975, 475, 9, 40, 41, 19), 30),
    20: ((15907, 500, 25, 53, 47, 0), (15111, 475, 23, 52, 48, 0), 35),
    10: ((19573, 500, 50, 69, 31, 0), (18591, 475, 47, 67, 33, 0), 40),
}
GOLDEN_C10_TOTALS = {200: 11203, 100: 12406, 50: 13996, 20: 17023, 10: 20431}
OFFICIAL_REAL_RATIO = {200: 237.5, 100: 118.75, 50: 52.8, 20: 20.7, 10: 10.1}


def _row(counts: np.ndarray) -> tuple[int, ...]:
    g = group_sizes(counts)
    return (int(counts.sum()), int(counts[0]), int(counts[-1]), g["many"], g["medium"], g["few"])


@pytest.mark.parametrize("rho", sorted(GOLDEN_C100))
def test_cifar100_golden_rows(rho):
    standard, official, overlap = GOLDEN_C100[rho]
    assert _row(lt_counts(500, 100, rho)) == standard
    counts = official_counts(500, 100, rho)
    assert _row(counts) == official
    assert counts[0] / counts[-1] == pytest.approx(OFFICIAL_REAL_RATIO[rho], abs=0.05)
    labels = np.repeat(np.arange(100), 500)
    sel = select_standard(labels, lt_counts(500, 100, rho), 25, seed=0)
    assert len(sel.overlap) == overlap


@pytest.mark.parametrize("rho", sorted(GOLDEN_C10_TOTALS))
def test_cifar10_golden_totals(rho):
    assert int(lt_counts(5000, 10, rho).sum()) == GOLDEN_C10_TOTALS[rho]


def test_rho_one_is_the_full_set():
    assert lt_counts(500, 100, 1.0).tolist() == [500] * 100


def test_standard_selection_properties():
    rng = np.random.Generator(np.random.PCG64(5))
    labels = rng.permutation(np.repeat(np.arange(100), 500))  # classes interleaved, as in the real file
    counts = lt_counts(500, 100, 100)
    sel = select_standard(labels, counts, 25, seed=3)
    assert np.bincount(labels[sel.train], minlength=100).tolist() == counts.tolist()
    assert np.bincount(labels[sel.val], minlength=100).tolist() == [25] * 100
    assert len(np.unique(sel.train)) == len(sel.train)
    assert len(np.unique(sel.val)) == len(sel.val)
    both = np.intersect1d(sel.train, sel.val)
    assert sorted(both.tolist()) == sorted(sel.overlap.tolist())
    assert set(labels[sel.overlap].tolist()) == {0, 1}  # the head (all used) and class 1 (23 unused)
    again = select_standard(labels, counts, 25, seed=3)
    other = select_standard(labels, counts, 25, seed=4)
    assert np.array_equal(sel.train, again.train)
    assert np.array_equal(sel.val, again.val)
    assert not np.array_equal(sel.train, other.train)


def test_official_selection_is_file_order():
    labels = np.tile(np.arange(3), 10)  # 10 per class, interleaved
    sel = select_official(labels, np.array([8, 4, 1]), k=2)
    cls0 = np.flatnonzero(labels == 0)
    assert sel.val[:2].tolist() == cls0[-2:].tolist()  # last k of the class, file order
    assert sel.train[:8].tolist() == cls0[:8].tolist()  # then the first n_c
    assert len(np.intersect1d(sel.train, sel.val)) == 0
    assert len(sel.overlap) == 0


# ----------------------------------------------------------------------------------------------------------
# End to end with fake pickle files in the real layout.


@pytest.fixture(scope="module")
def fake_cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.Generator(np.random.PCG64(0))
    train_labels = rng.permutation(np.repeat(np.arange(100), 30))
    data = cifar_rows(rng, 3000)
    test = (cifar_rows(rng, 200), np.repeat(np.arange(100), 2).tolist())
    write_cifar100(root, (data, train_labels.tolist()), test)
    return root, data, train_labels


@pytest.mark.parametrize("variant", ["standard", "official"])
def test_cifar100_end_to_end(fake_cifar100, variant):
    root, data, train_labels = fake_cifar100
    cfg = DataConfig(
        dataset="cifar100_lt", root=str(root), imbalance=10, val_per_class=5, cifar_variant=variant
    )
    b = DATASETS.get("cifar100_lt")(cfg, 0)
    per_class = 30 if variant == "standard" else 25
    expected = lt_counts(per_class, 100, 10)
    assert b.class_counts.tolist() == expected.tolist()
    assert np.bincount(b.val.labels, minlength=100).tolist() == [5] * 100
    assert len(b.test) == 200
    assert b.class_names[7] == "n7"
    # Pixels: sample i of the train split is row train_indices[i] of the file, CHW-planar → HWC.
    idx = np.asarray(b.info["train_indices"])
    chw = data[idx[:3]].reshape(3, 3, 32, 32)
    assert torch.equal(b.train.images[:3], torch.from_numpy(chw.transpose(0, 2, 3, 1).copy()))
    assert np.array_equal(b.train.labels, train_labels[idx])
    val_idx = np.asarray(b.info["meta_indices"])
    assert np.array_equal(b.val.labels, train_labels[val_idx])
    overlap = len(np.intersect1d(idx, val_idx))
    # Standard: each class tops up k − (30 − n_c) images when fewer than k were left unused.
    shortfall = int(np.maximum(0, 5 - (30 - expected)).sum()) if variant == "standard" else 0
    assert overlap == b.info["overlap"] == shortfall


def test_cifar10_end_to_end(tmp_path):
    rng = np.random.Generator(np.random.PCG64(1))
    train = []
    for _ in range(5):
        labels = rng.permutation(np.repeat(np.arange(10), 4))  # drawn before the batch's pixels
        train.append((cifar_rows(rng, 40), labels.tolist()))
    write_cifar10(tmp_path, train, (cifar_rows(rng, 20), list(range(10)) * 2))
    b = DATASETS.get("cifar10_lt")(DataConfig(root=str(tmp_path), imbalance=5, val_per_class=3), 2)
    assert b.class_counts.tolist() == lt_counts(20, 10, 5).tolist()
    assert b.mean[0] == pytest.approx(0.4914)
    assert b.class_names[0] == "c0"


def test_missing_root_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        DATASETS.get("cifar100_lt")(DataConfig(root=str(tmp_path)), 0)
