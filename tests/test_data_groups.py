"""Shot groups from training counts: thresholds and per-group accuracies (SPEC §10)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dnet_fast.data.groups import FEW_THRESHOLD, MANY_THRESHOLD, group_accuracies, group_sizes, shot_groups


def test_thresholds_are_the_standard_ones():
    assert (MANY_THRESHOLD, FEW_THRESHOLD) == (100, 20)


@pytest.mark.parametrize(
    ("count", "group"),
    [(0, "few"), (19, "few"), (20, "medium"), (50, "medium"), (100, "medium"), (101, "many"), (5000, "many")],
)
def test_group_edges(count, group):
    assert shot_groups(np.array([count]))[0] == group


def test_group_accuracies_and_overall():
    counts = np.array([500, 300, 60, 30, 10, 5])
    acc = np.array([0.9, 0.7, 0.6, 0.4, 0.2, 0.0])
    out = group_accuracies(acc, counts)
    assert out["many"] == pytest.approx(0.8)
    assert out["medium"] == pytest.approx(0.5)
    assert out["few"] == pytest.approx(0.1)
    assert out["overall"] == pytest.approx(acc.mean())


def test_empty_group_is_nan():
    out = group_accuracies(np.array([0.5, 1.0]), np.array([200, 150]))
    assert math.isnan(out["medium"])
    assert math.isnan(out["few"])
    assert out["many"] == pytest.approx(0.75)


def test_group_sizes_and_shape_mismatch():
    assert group_sizes(np.array([101, 100, 20, 19])) == {"many": 1, "medium": 2, "few": 1}
    with pytest.raises(ValueError, match="shape"):
        group_accuracies(np.zeros(3), np.zeros(4))
