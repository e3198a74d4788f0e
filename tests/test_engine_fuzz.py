"""Property-based fuzzing of the bindings: on any input the engine equals its NumPy twin or both raise alike."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dnet_fast import _reference as ref
from dnet_fast import sampling

_C = sampling._C

# tools/sanitize_tests.sh lowers the example count: the sanitized build is several times slower.
FUZZ = settings(
    max_examples=int(os.environ.get("DNET_FAST_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

INT_DTYPES = st.sampled_from([np.int64, np.int32, np.int8, np.uint8, np.uint64])
ANY_DTYPES = st.one_of(INT_DTYPES, st.sampled_from([np.float32, np.float64, np.bool_]))
SMALL = st.integers(-3, 40)
SEEDS = st.one_of(st.integers(0, 2**64 - 1), st.integers(-5, -1), st.just(2**64))


def labels_strategy(dtypes=ANY_DTYPES, max_size=60, low=-2, high=12):
    return dtypes.flatmap(
        lambda dt: hnp.arrays(
            dt,
            hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=max_size)
            if dt is np.int64
            else st.integers(0, max_size).map(lambda n: (n,)),
            elements=st.integers(max(low, 0) if np.dtype(dt).kind in "ub" else low, high)
            if np.dtype(dt).kind != "b"
            else st.booleans(),
        )
    )


def same_outcome(fast, twin):
    """Run both; they must raise the same exception type or return equal results."""
    outcomes = []
    for fn in (fast, twin):
        try:
            outcomes.append(("ok", fn()))
        except (ValueError, TypeError) as exc:
            outcomes.append(("raise", type(exc)))
    (kind_a, a), (kind_b, b) = outcomes
    assert kind_a == kind_b, outcomes
    if kind_a == "raise":
        assert a is b
    elif isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    else:
        np.testing.assert_array_equal(a, b)
    return outcomes[0]


@FUZZ
@given(labels=labels_strategy(), num_classes=SMALL, seed=SEEDS, step=SMALL, k=st.integers(-1, 6), m=SMALL)
def test_meta_sampler_fuzz(labels, num_classes, seed, step, k, m):
    def run(impl):
        return lambda: impl.MetaSampler(labels, num_classes, seed).batches(step, k, m)

    same_outcome(run(_C), run(ref))


@FUZZ
@given(
    labels=labels_strategy(),
    kind=st.sampled_from([*sampling.EPOCH_KINDS, "bogus"]),
    seed=SEEDS,
    epoch=st.integers(-1, 20),
    world=st.integers(0, 5),
    rank=st.integers(-1, 5),
    num_epochs=st.integers(0, 8),
    num_samples=st.integers(-2, 90),
    per_visit=st.integers(0, 5),
)
def test_epoch_order_fuzz(labels, kind, seed, epoch, world, rank, num_epochs, num_samples, per_visit):
    args = (labels, kind, seed, epoch, rank, world, num_epochs, num_samples, per_visit)
    same_outcome(lambda: _C.epoch_order(*args), lambda: ref.epoch_order(*args))


@FUZZ
@given(
    logits=st.tuples(
        hnp.arrays(
            np.float64,
            hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9),
            elements=st.sampled_from([-1.0, 0.0, 0.5, 1.0, np.inf, -np.inf, np.nan]),
        ),
        st.sampled_from([np.float16, np.float32, np.float64, np.int32]),
    ).map(lambda t: (t[0] == 1).astype(t[1]) if t[1] is np.int32 else t[0].astype(t[1])),
    label=labels_strategy(dtypes=INT_DTYPES, max_size=9, high=9),
    num_classes=st.integers(-1, 10),
    topk=st.integers(-1, 10),
    threads=st.integers(0, 3),
)
def test_counts_from_logits_fuzz(logits, label, num_classes, topk, threads):
    same_outcome(
        lambda: _C.counts_from_logits(logits, label, num_classes, topk, threads),
        lambda: ref.counts_from_logits(logits, label, num_classes, topk, threads),
    )


@FUZZ
@given(
    key=SEEDS,
    bounds=hnp.arrays(
        st.sampled_from([np.uint64, np.int64]), st.integers(0, 20), elements=st.integers(0, 2**63 - 1)
    ),
    n=st.integers(-2, 300),
)
def test_primitives_fuzz(key, bounds, n):
    same_outcome(lambda: _C.random_bounded(key, bounds), lambda: ref.random_bounded(key, bounds))
    same_outcome(lambda: _C.permutation(n, key), lambda: ref.permutation(n, key))
