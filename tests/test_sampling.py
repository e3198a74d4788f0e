"""Sampler engine: C++ == NumPy twin bit for bit, balance and coverage statistics, bad inputs, facade."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest

from dnet_fast import _reference as ref
from dnet_fast import sampling
from dnet_fast.sampling import MetaBatchSampler, epoch_order

_C = sampling._C
KINDS = sampling.EPOCH_KINDS


def profile_labels(kind: str, num_classes: int, seed: int = 0) -> np.ndarray:
    """Shuffled labels with a named class-size profile (every class non-empty)."""
    c = np.arange(num_classes)
    if kind == "flat":
        counts = np.full(num_classes, 5)
    elif kind == "exp":  # long tail from 40 down to 1
        counts = np.round(40 * (1 / 40) ** (c / max(num_classes - 1, 1))).astype(int)
    elif kind == "ones":  # every class a single sample
        counts = np.ones(num_classes, dtype=int)
    else:  # "mixed": random sizes 1..12
        counts = np.random.default_rng(seed).integers(1, 13, size=num_classes)
    labels = np.repeat(c, counts)
    return np.random.default_rng(seed).permutation(labels)


# ---------------------------------------------------------------------------------------------------------------
# Primitives.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [0, 1, 2**64 - 1, 0x1234567890ABCDEF])
def test_random_bounded_matches_twin_including_rejections(key):
    # Bounds just above 2**63 reject about half of all words, exercising the retry chain.
    bounds = np.array([1, 2, 3, 7, 10**9, 2**32 + 1, 2**63 + 1, 2**63 + 1, 2**64 - 1] * 8, dtype=np.uint64)
    out = _C.random_bounded(key, bounds)
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, ref.random_bounded(key, bounds))
    assert (out < bounds).all()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 257, 5000])
@pytest.mark.parametrize("key", [0, 99, 2**63])
def test_permutation_matches_twin(n, key):
    out = _C.permutation(n, key)
    np.testing.assert_array_equal(out, ref.permutation(n, key))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_permutation_is_uniform():
    # All 3! orders about equally likely over 6000 keys (chi-square, 5 dof, p ~ 1e-4 threshold).
    seen = np.zeros(6)
    perms = {p: i for i, p in enumerate(itertools.permutations(range(3)))}
    for key in range(6000):
        seen[perms[tuple(_C.permutation(3, key).tolist())]] += 1
    assert ((seen - 1000) ** 2 / 1000).sum() < 25


def test_bounded_is_uniform():
    counts = np.bincount(
        _C.random_bounded(7, np.full(30000, 6, dtype=np.uint64)).astype(np.int64), minlength=6
    )
    assert ((counts - 5000) ** 2 / 5000).sum() < 25


# ---------------------------------------------------------------------------------------------------------------
# Meta batches: bit-exact.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["flat", "exp", "ones", "mixed"])
@pytest.mark.parametrize("num_classes", [1, 3, 10, 37])
@pytest.mark.parametrize("seed", [0, 12345])
def test_meta_batches_match_twin(profile, num_classes, seed):
    labels = profile_labels(profile, num_classes, seed)
    fast, twin = _C.MetaSampler(labels, num_classes, seed), ref.MetaSampler(labels, num_classes, seed)
    for m, step, k in [(1, 0, 9), (3, 5, 7), (num_classes, 2, 4), (2 * num_classes + 1, 0, 5), (16, 11, 6)]:
        np.testing.assert_array_equal(fast.batches(step, k, m), twin.batches(step, k, m), err_msg=f"m={m}")


def test_meta_batches_compose_in_any_call_order():
    labels = profile_labels("mixed", 13, 3)
    s = MetaBatchSampler(labels, seed=5)
    whole = s.batches(0, 40, 6)
    # Out of order, one at a time, then overlapping blocks: the per-class cache must never leak into results.
    for step in [39, 0, 17, 16, 3, 38]:
        np.testing.assert_array_equal(s.batch(step, 6), whole[step])
    np.testing.assert_array_equal(s.batches(10, 20, 6), whole[10:30])
    # Step-by-step continuation (the trainer's pattern) resumes from the cached position; a change of m must not.
    np.testing.assert_array_equal(np.stack([s.batch(i, 6) for i in range(40)]), whole)
    np.testing.assert_array_equal(s.batch(40, 5), MetaBatchSampler(labels, seed=5).batch(40, 5))
    np.testing.assert_array_equal(s.batches(41, 3, 5), MetaBatchSampler(labels, seed=5).batches(41, 3, 5))
    np.testing.assert_array_equal(MetaBatchSampler(labels, seed=5).batches(25, 15, 6), whole[25:])


def test_meta_batches_threads_agree():
    labels = profile_labels("exp", 50, 1)
    s = MetaBatchSampler(labels, seed=2)
    expected = s.batches(0, 200, 30)
    results = [None] * 4

    def work(i):
        results[i] = np.concatenate([s.batches(step, 10, 30) for step in range(i * 10, 200, 40)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in enumerate(results):
        want = np.concatenate([expected[step : step + 10] for step in range(i * 10, 200, 40)])
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Meta batches: balance and coverage.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("num_classes", "m"), [(10, 4), (10, 10), (10, 25), (7, 100), (37, 16), (1, 5)])
def test_meta_batches_are_balanced(num_classes, m):
    labels = profile_labels("mixed", num_classes, 4)
    per_round = num_classes // math.gcd(m, num_classes)
    batches = MetaBatchSampler(labels, seed=9).batches(3 * per_round, 2 * per_round, m)
    counts = np.stack([np.bincount(labels[b], minlength=num_classes) for b in batches])  # (k, C)
    assert counts.min() >= m // num_classes
    assert counts.max() <= -(-m // num_classes)
    # Every round (here two, aligned) holds each class equally often.
    for r in range(2):
        per_class = counts[r * per_round : (r + 1) * per_round].sum(axis=0)
        assert (per_class == m * per_round // num_classes).all()


def test_meta_batches_cycle_each_class_without_replacement():
    labels = profile_labels("exp", 12, 6)
    s = MetaBatchSampler(labels, seed=1)
    stream = s.batches(0, 400, 12).ravel()  # m = C: one draw per class per batch
    for c in range(12):
        members = np.flatnonzero(labels == c)
        draws = stream[labels[stream] == c]
        n_c = members.size
        for cycle in range(draws.size // n_c):
            np.testing.assert_array_equal(np.sort(draws[cycle * n_c : (cycle + 1) * n_c]), members)


def test_meta_batch_order_is_random_across_rounds():
    labels = np.arange(100)  # C = 100 classes of one sample
    s = MetaBatchSampler(labels, seed=3)
    rounds = s.batches(0, 20, 100)
    assert len({tuple(r) for r in rounds.tolist()}) == 20  # a fresh class order per batch
    first = rounds[:, 0]
    assert len(set(first.tolist())) > 10


# ---------------------------------------------------------------------------------------------------------------
# Epoch orders: bit-exact.
# ---------------------------------------------------------------------------------------------------------------
EPOCH_CASES = [
    # (labels, num_samples or -1)
    (profile_labels("exp", 20, 1), -1),
    (profile_labels("ones", 9, 2), -1),
    (profile_labels("mixed", 31, 3), 250),
    (np.array([0, 0, 0, 5, 5, 9]), 13),  # empty classes 1-4, 6-8 are never drawn
    (np.zeros(7, dtype=np.int64), -1),
    (np.array([3]), 5),
]


@pytest.mark.parametrize(("labels", "num_samples"), EPOCH_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_epoch_order_matches_twin(labels, num_samples, kind):
    if kind == "uniform":
        num_samples = -1
    for epoch, world_size, per_visit, seed in [
        (0, 1, 4, 0),
        (3, 2, 1, 77),
        (7, 3, 3, 2**64 - 1),
        (12, 8, 2, 5),
    ]:
        for rank in range(world_size):
            args = (labels, kind, seed, epoch, rank, world_size, 10, num_samples, per_visit)
            np.testing.assert_array_equal(
                _C.epoch_order(*args), ref.epoch_order(*args), err_msg=str(args[1:])
            )


def test_epoch_order_empty_labels():
    for kind in KINDS:
        assert epoch_order(np.zeros(0, dtype=np.int64), kind, seed=0, epoch=0, world_size=2).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Epoch orders: statistics.
# ---------------------------------------------------------------------------------------------------------------
def test_uniform_covers_every_sample_once_per_epoch_and_changes():
    labels = profile_labels("mixed", 20, 0)
    a = epoch_order(labels, seed=1, epoch=0)
    b = epoch_order(labels, seed=1, epoch=1)
    np.testing.assert_array_equal(np.sort(a), np.arange(labels.size))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, epoch_order(labels, seed=1, epoch=0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_ranks_partition_the_padded_epoch(kind, world_size):
    labels = profile_labels("exp", 15, 2)
    full = epoch_order(labels, kind, seed=4, epoch=2, num_epochs=5)
    shards = [
        epoch_order(labels, kind, seed=4, epoch=2, rank=r, world_size=world_size, num_epochs=5)
        for r in range(world_size)
    ]
    per_rank = -(-full.size // world_size)
    assert {s.size for s in shards} == {per_rank}
    interleaved = np.stack(shards, axis=1).ravel()  # undo the stride split
    np.testing.assert_array_equal(interleaved, np.resize(full, per_rank * world_size))


def test_class_aware_visits_classes_in_groups_and_balances():
    labels = profile_labels("exp", 25, 5)
    order = epoch_order(labels, "class_aware", seed=3, epoch=0, num_samples=25 * 4 * 6, per_visit=4)
    cls = labels[order].reshape(-1, 4)
    assert (cls == cls[:, :1]).all()  # each visit takes per_visit samples of one class
    # Every cycle of 25 visits sees each class once.
    for cycle in cls[:, 0].reshape(6, 25):
        np.testing.assert_array_equal(np.sort(cycle), np.arange(25))


def test_class_aware_continues_class_cycles_across_epochs():
    labels = np.repeat(np.arange(3), [5, 2, 1])
    draws = np.concatenate(
        [epoch_order(labels, "class_aware", seed=8, epoch=e, per_visit=1) for e in range(5)]
    )
    for c, n_c in enumerate([5, 2, 1]):
        mine = draws[labels[draws] == c]
        for cycle in range(mine.size // n_c):
            np.testing.assert_array_equal(
                np.sort(mine[cycle * n_c : (cycle + 1) * n_c]), np.flatnonzero(labels == c)
            )


def test_sqrt_quotas_and_coverage():
    sizes = np.array([400, 100, 25, 4, 1])
    labels = np.repeat(np.arange(5), sizes)
    length = labels.size
    expected = length * np.sqrt(sizes) / np.sqrt(sizes).sum()
    epochs = [epoch_order(labels, "sqrt", seed=2, epoch=e) for e in range(8)]
    counts = np.bincount(labels[epochs[0]], minlength=5)
    assert counts.sum() == length
    assert (np.abs(counts - expected) < 1).all()
    # Over 8 epochs every sample of class c appears floor or ceil of 8 * quota / n_c times.
    seen = np.bincount(np.concatenate(epochs), minlength=length)
    times = 8 * counts[labels] / sizes[labels]
    assert ((seen >= np.floor(times)) & (seen <= np.ceil(times))).all()


def test_progressive_moves_from_instance_to_class_balanced():
    sizes = np.array([300, 60, 30, 8, 2])
    labels = np.repeat(np.arange(5), sizes)
    at = {
        e: np.bincount(
            labels[epoch_order(labels, "progressive", seed=1, epoch=e, num_epochs=10)], minlength=5
        )
        for e in (0, 5, 10, 14)
    }
    np.testing.assert_array_equal(at[0], sizes)  # instance-balanced: counts equal class sizes exactly
    np.testing.assert_array_equal(at[10], np.full(5, 80))  # class-balanced at t = T ...
    np.testing.assert_array_equal(at[14], at[10])  # ... and after
    half = 0.5 * sizes + 0.5 * sizes.sum() / 5
    assert (np.abs(at[5] - half) < 1).all()


def test_epoch_orders_depend_on_seed_and_epoch():
    labels = profile_labels("exp", 10, 0)
    for kind in KINDS:
        base = epoch_order(labels, kind, seed=0, epoch=0)
        assert not np.array_equal(base, epoch_order(labels, kind, seed=1, epoch=0))
        assert not np.array_equal(base, epoch_order(labels, kind, seed=0, epoch=1))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: the same error from the engine and its twin.
# ---------------------------------------------------------------------------------------------------------------
GOOD = np.array([0, 1, 1, 2])


@pytest.mark.parametrize(
    ("labels", "num_classes", "seed", "match"),
    [
        (GOOD.astype(np.float32), 3, 0, "labels must be an integer array"),
        (GOOD.astype(bool), 3, 0, "labels must be an integer array"),
        (GOOD.reshape(2, 2), 3, 0, "labels must be 1-D"),
        (np.array([0, -1]), 3, 0, r"labels\[1\] = -1"),
        (np.array([0, 3]), 3, 0, r"labels\[1\] = 3 is outside \[0, 3\)"),
        (GOOD, 0, 0, "num_classes"),
        (GOOD, 3, -1, "seed"),
        (GOOD, 3, 2**64, "seed"),
    ],
)
@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_meta_sampler_rejects_bad_construction(impl, labels, num_classes, seed, match):
    with pytest.raises(ValueError, match=match):
        impl.MetaSampler(labels, num_classes, seed)


@pytest.mark.parametrize(
    ("step", "k", "m", "match"),
    [
        (0, 1, 0, "m must be"),
        (0, 1, -3, "m must be"),
        (-1, 1, 2, "step"),
        (0, -1, 2, "k must be"),
        (2**61, 2, 2, r"\(step \+ k\) \* m"),
    ],
)
@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_meta_batches_reject_bad_request(impl, step, k, m, match):
    with pytest.raises(ValueError, match=match):
        impl.MetaSampler(GOOD, 3, 0).batches(step, k, m)


@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_meta_batches_reject_empty_class_only_when_needed(impl):
    s = impl.MetaSampler(np.array([0, 0, 2, 2]), 4, 0)  # classes 1 and 3 are empty
    with pytest.raises(ValueError, match="has no samples"):
        s.batches(0, 1, 4)
    with pytest.raises(ValueError, match="has no samples"):
        s.batches(0, 8, 1)
    assert s.batches(0, 0, 4).shape == (0, 4)


@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_non_integer_scalars_are_type_errors(impl):
    with pytest.raises(TypeError, match="step must be an integer"):
        impl.MetaSampler(GOOD, 3, 0).batches(1.5, 1, 2)
    with pytest.raises(TypeError, match="seed must be an integer"):
        impl.MetaSampler(GOOD, 3, "7")
    assert impl.MetaSampler(GOOD, np.int32(3), np.uint64(5)).batches(np.int64(2), 1, 3).shape == (1, 3)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"labels": GOOD.astype(np.float64)}, "labels must be an integer array"),
        ({"labels": GOOD[None]}, "labels must be 1-D"),
        ({"labels": np.array([0, -2])}, r"labels\[1\] = -2"),
        ({"kind": "balanced"}, "kind must be one of"),
        ({"kind": 3}, "kind must be one of"),
        ({"seed": -5}, "seed"),
        ({"epoch": -1}, "epoch"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"per_visit": 0}, "per_visit"),
        ({"num_samples": -2}, "num_samples"),
        ({"kind": "uniform", "num_samples": 3}, "num_samples must be left unset"),
        ({"labels": np.zeros(0, dtype=np.int64), "num_samples": 3}, "labels is empty"),
    ],
)
@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_epoch_order_rejects_bad_input(impl, overrides, match):
    args = {
        "labels": GOOD,
        "kind": "sqrt",
        "seed": 0,
        "epoch": 0,
        "rank": 0,
        "world_size": 1,
        "num_epochs": 1,
        "num_samples": -1,
        "per_visit": 4,
    } | overrides
    with pytest.raises(ValueError, match=match):
        impl.epoch_order(**args)


@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_primitives_reject_bad_input(impl):
    with pytest.raises(ValueError, match="bounds must be positive"):
        impl.random_bounded(0, np.array([3, 0], dtype=np.uint64))
    with pytest.raises(ValueError, match="bounds must be positive"):
        impl.random_bounded(0, np.array([-3]))
    with pytest.raises(ValueError, match="bounds must be an integer array"):
        impl.random_bounded(0, np.array([3.0]))
    with pytest.raises(ValueError, match="n must be"):
        impl.permutation(-1, 0)
    with pytest.raises(ValueError, match="key"):
        impl.permutation(3, -1)


# ---------------------------------------------------------------------------------------------------------------
# Facade.
# ---------------------------------------------------------------------------------------------------------------
def test_facade_defaults_and_shapes():
    labels = profile_labels("exp", 8, 0)
    s = MetaBatchSampler(labels, seed=0)
    assert s.num_classes == 8
    np.testing.assert_array_equal(s.class_sizes, np.bincount(labels))
    assert s.batch(3, 5).shape == (5,)
    assert s.batch(3, 5).dtype == np.int64
    assert s.batches(3, 4, 5).shape == (4, 5)
    assert MetaBatchSampler(labels, 10, seed=0).num_classes == 10
    out = epoch_order(labels.tolist(), seed=0, epoch=0)  # lists are accepted
    assert out.dtype == np.int64
    assert out.shape == (labels.size,)
    assert epoch_order(labels, "class_aware", seed=0, epoch=0, num_samples=10, world_size=3).shape == (4,)
    with pytest.raises(ValueError, match="labels is empty"):
        MetaBatchSampler(np.zeros(0, dtype=np.int64), seed=0)
