"""NumPy twin of every ``dnet_fast._C`` function: the readable specification the C++ engine must match bit for bit."""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = [
    "MetaSampler",
    "counts_from_logits",
    "epoch_order",
    "permutation",
    "random_bounded",
]

# ---------------------------------------------------------------------------------------------------------------
# Portable randomness. Every random word is a hash of (key, counter), so any output is a pure function of its
# inputs and can be computed out of order (vectorised here, streamed in C++). All arithmetic is modulo 2**64.
# ---------------------------------------------------------------------------------------------------------------
_U64 = np.uint64
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64 increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_M32 = 0xFFFFFFFF
_MAX_COUNT = 2**31  # sample counts, class counts and epoch lengths stay below this so products fit in 64 bits

# Stream domains: independent key families for the different consumers of randomness.
_DOMAIN_META_ROUND = 1  # class order of a meta-batch round
_DOMAIN_META_CLASS = 2  # per-class permutations for meta batches
_DOMAIN_EPOCH_CLASS = 3  # per-class permutations for epoch orders
_DOMAIN_EPOCH_SHUFFLE = 4  # whole-epoch shuffles
_DOMAIN_CLASS_CYCLE = 5  # class visiting order of the class-aware sampler

_KINDS = ("uniform", "class_aware", "sqrt", "progressive")


def _u64(x: object) -> np.ndarray:
    # Always 1-D: NumPy warns on overflow for scalar arithmetic but wraps silently for arrays, which we want.
    return np.atleast_1d(np.asarray(x, dtype=_U64))


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (a bijection of uint64)."""
    z = (z ^ (z >> _U64(30))) * _U64(_MIX1)
    z = (z ^ (z >> _U64(27))) * _U64(_MIX2)
    return z ^ (z >> _U64(31))


def _hash2(key: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Random word number ``x`` of stream ``key``: mix64(key + golden * (x + 1))."""
    return _mix64(_u64(key) + _U64(_GOLDEN) * (_u64(x) + _U64(1)))


def _seed_key(seed: int, domain: int) -> np.ndarray:
    return _hash2(_mix64(_u64(seed)), _u64(domain))


def _key_int(key: np.ndarray) -> int:
    return int(key[0])


def _mul128(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit halves of the 128-bit product a * b, from 32-bit limbs (no 128-bit type needed)."""
    m32, s32 = _U64(_M32), _U64(32)
    a_lo, a_hi, b_lo, b_hi = a & m32, a >> s32, b & m32, b >> s32
    lh, hl = a_lo * b_hi, a_hi * b_lo
    mid = ((a_lo * b_lo) >> s32) + (lh & m32) + (hl & m32)
    high = a_hi * b_hi + (lh >> s32) + (hl >> s32) + (mid >> s32)
    return high, a * b


def _bounded(key: np.ndarray, index: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Lemire's nearly divisionless bounded integer: uniform in [0, bound) from word ``index`` of ``key``.

    A rejected word is replaced by mix64(word + golden) until accepted (probability of even one retry is
    bound / 2**64).
    """
    bound = _u64(bound) * np.ones_like(_u64(index))
    x = _hash2(key, index)
    high, low = _mul128(x, bound)
    threshold = (_U64(0) - bound) % bound
    retry = low < threshold
    while retry.any():
        x[retry] = _mix64(x[retry] + _U64(_GOLDEN))
        high[retry], low[retry] = _mul128(x[retry], bound[retry])
        retry &= low < threshold
    return high


def random_bounded(key: int, bounds: np.ndarray) -> np.ndarray:
    """Bounded integers ``out[i]`` uniform in ``[0, bounds[i])`` drawn from word ``i`` of stream ``key``.

    Args:
        key: 64-bit stream key.
        bounds: positive uint64 bounds.

    Returns:
        uint64 array of the same length.
    """
    key_arr = _u64(_check_u64(key, "key"))
    bounds = np.asarray(bounds)
    if bounds.dtype.kind not in "iu":
        raise ValueError(f"bounds must be an integer array, got dtype {bounds.dtype}")
    if bounds.ndim != 1:
        raise ValueError(f"bounds must be 1-D, got ndim={bounds.ndim}")
    if bounds.size and (bounds.dtype.kind == "i" and bounds.min() <= 0 or bounds.min() == 0):
        raise ValueError("bounds must be positive")
    if bounds.size == 0:
        return np.zeros(0, dtype=_U64)
    return _bounded(key_arr, np.arange(bounds.size, dtype=_U64), bounds.astype(_U64))


def permutation(n: int, key: int) -> np.ndarray:
    """Fisher–Yates permutation of ``range(n)``: for i = n-1 .. 1 swap a[i] with a[bounded(key, i, i + 1)].

    Args:
        n: length (non-negative).
        key: 64-bit stream key.

    Returns:
        int64 array, a permutation of ``range(n)``.
    """
    _check_count(n, "n", limit=_MAX_COUNT)
    return _permute(np.arange(n, dtype=np.int64), _u64(_check_u64(key, "key")))


def _permute(values: np.ndarray, key: np.ndarray) -> np.ndarray:
    n = values.size
    if n < 2:
        return values.copy()
    i = np.arange(1, n, dtype=_U64)
    swaps = _bounded(key, i, i + _U64(1)).tolist()  # swaps[i - 1] = j for position i
    out = values.tolist()
    for pos in range(n - 1, 0, -1):  # the swaps are sequential by nature; the draws above are not
        j = swaps[pos - 1]
        out[pos], out[j] = out[j], out[pos]
    return np.asarray(out, dtype=values.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Input validation (messages mirror csrc/bindings.cpp).
# ---------------------------------------------------------------------------------------------------------------
def _index(value: object, name: str) -> int:
    try:
        return operator.index(value)  # integers only: 1.5 is a TypeError, as in the bindings
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def _check_u64(value: int, name: str) -> int:
    value = _index(value, name)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _check_count(value: int, name: str, *, positive: bool = False, limit: int = 2**62) -> int:
    value = _index(value, name)
    low = 1 if positive else 0
    if not low <= value < limit:
        raise ValueError(f"{name} must be in [{low}, {limit}), got {value}")
    return value


def _as_int64(a: object, name: str) -> np.ndarray:
    """1-D integer array of any width as C-contiguous int64; rejects float, bool and object arrays."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got ndim={arr.ndim}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_labels(label: np.ndarray, num_classes: int, name: str = "label") -> None:
    bad = np.flatnonzero((label < 0) | (label >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {int(label[i])} is outside [0, {num_classes})")


def _class_table(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR table: members of class c are ``order[offsets[c]:offsets[c + 1]]``, ascending sample index."""
    counts = np.bincount(labels, minlength=num_classes)
    offsets = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return np.argsort(labels, kind="stable").astype(np.int64), offsets


def _draw(
    order: np.ndarray, offsets: np.ndarray, base: np.ndarray, cls: np.ndarray, d: np.ndarray
) -> np.ndarray:
    """Draw number ``d`` from class ``c``: element d % n_c of the class permutation of cycle d // n_c.

    The permutation of (c, cycle) shuffles the class's members with key hash2(hash2(base, c), cycle), so each class
    is exhausted before any of its samples repeats.
    """
    out = np.empty(cls.size, dtype=np.int64)
    if cls.size == 0:
        return out
    n = offsets[cls + 1] - offsets[cls]
    cycle, pos = d // n, d % n
    pairs, inverse = np.unique(np.stack([cls, cycle]), axis=1, return_inverse=True)
    by_pair = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.reshape(-1), minlength=pairs.shape[1]))
    for (c, q), hit in zip(pairs.T.tolist(), np.split(by_pair, bounds[:-1]), strict=True):
        members = order[offsets[c] : offsets[c + 1]]
        out[hit] = _permute(members, _hash2(_hash2(base, _u64(c)), _u64(q)))[pos[hit]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Meta batches.
# ---------------------------------------------------------------------------------------------------------------
class MetaSampler:
    """Class-balanced meta batches: a pure function of (seed, step).

    Batch ``s`` of size ``m`` over ``C`` classes: with g = gcd(m, C), a *round* is L = C / g batches. Round R uses
    the class permutation pi_R (key hash2(seed_key(seed, META_ROUND), R)); slot j of batch s = R * L + b takes
    class pi_R[t mod C] with t = b * m + j, and is that class's draw number R * (m / g) + t // C. A batch thus holds
    floor(m / C) or ceil(m / C) of every class (m distinct classes when m < C), and every round holds exactly
    m / g of each class.

    Args:
        labels: (N,) integer labels in [0, num_classes).
        num_classes: number of classes C (>= 1).
        seed: 64-bit seed.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, seed: int) -> None:
        labels = _as_int64(labels, "labels")
        if labels.size >= _MAX_COUNT:
            raise ValueError(f"labels must have fewer than 2**31 entries, got {labels.size}")
        _check_count(num_classes, "num_classes", positive=True, limit=_MAX_COUNT)
        _check_labels(labels, num_classes, "labels")
        self.num_classes = int(num_classes)
        self.seed = _check_u64(seed, "seed")
        self._order, self._offsets = _class_table(labels, self.num_classes)

    def class_sizes(self) -> np.ndarray:
        """(C,) int64 number of samples per class."""
        return np.diff(self._offsets)

    def batches(self, step: int, k: int, m: int) -> np.ndarray:
        """Indices of meta batches ``step .. step + k - 1``, shape (k, m) int64."""
        step = _check_count(step, "step")
        k = _check_count(k, "k")
        m = _check_count(m, "m", positive=True, limit=_MAX_COUNT)
        if (step + k) * m >= 2**62:
            raise ValueError("(step + k) * m must be below 2**62")
        num_c = self.num_classes
        g = math.gcd(m, num_c)
        per_round, draws_per_round = num_c // g, m // g
        s = np.arange(step, step + k, dtype=np.int64)
        rounds, b = s // per_round, s % per_round
        t = b[:, None] * m + np.arange(m, dtype=np.int64)[None, :]  # (k, m) slot within the round
        cls = np.empty((k, m), dtype=np.int64)
        round_key = _seed_key(self.seed, _DOMAIN_META_ROUND)
        for r in np.unique(rounds).tolist():
            rows = rounds == r
            pi = _permute(np.arange(num_c, dtype=np.int64), _hash2(round_key, _u64(r)))
            cls[rows] = pi[t[rows] % num_c]
        d = rounds[:, None] * draws_per_round + t // num_c
        self._check_nonempty(cls)
        base = _seed_key(self.seed, _DOMAIN_META_CLASS)
        return _draw(self._order, self._offsets, base, cls.ravel(), d.ravel()).reshape(k, m)

    def _check_nonempty(self, cls: np.ndarray) -> None:
        sizes = self.class_sizes()
        empty = cls[sizes[cls] == 0]
        if empty.size:
            raise ValueError(f"class {int(empty.min())} has no samples but a meta batch asks for it")


# ---------------------------------------------------------------------------------------------------------------
# Epoch orders.
# ---------------------------------------------------------------------------------------------------------------
def epoch_order(
    labels: np.ndarray,
    kind: str,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_epochs: int,
    num_samples: int,
    per_visit: int,
) -> np.ndarray:
    """One rank's sample order for one epoch (see ``dnet_fast.sampling.epoch_order`` for the semantics).

    Args:
        labels: (N,) non-negative integer labels; classes are 0 .. max(labels), empty ones are never drawn.
        kind: ``uniform | class_aware | sqrt | progressive``.
        seed: 64-bit seed.
        epoch: epoch number (>= 0).
        rank: this process's rank in [0, world_size).
        world_size: number of processes (>= 1).
        num_epochs: T of the progressive schedule (>= 1).
        num_samples: global epoch length; -1 means N. ``uniform`` accepts only -1 or N.
        per_visit: samples taken per class visit by ``class_aware`` (>= 1).

    Returns:
        (ceil(L / world_size),) int64 sample indices.
    """
    labels = _as_int64(labels, "labels")
    n = labels.size
    if n >= _MAX_COUNT:
        raise ValueError(f"labels must have fewer than 2**31 entries, got {n}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}; got {kind!r}")
    seed = _check_u64(seed, "seed")
    epoch = _check_count(epoch, "epoch", limit=2**31)
    world_size = _check_count(world_size, "world_size", positive=True, limit=2**31)
    rank = _check_count(rank, "rank", limit=world_size)
    num_epochs = _check_count(num_epochs, "num_epochs", positive=True, limit=2**31)
    per_visit = _check_count(per_visit, "per_visit", positive=True, limit=2**31)
    num_samples = _index(num_samples, "num_samples")
    length = n if num_samples == -1 else _check_count(num_samples, "num_samples", limit=_MAX_COUNT)
    if kind == "uniform" and length != n:
        raise ValueError("num_samples must be left unset (or equal len(labels)) for kind='uniform'")
    _check_labels(labels, 2**31, "labels")
    if length and n == 0:
        raise ValueError("labels is empty but num_samples > 0")
    order = _global_order(labels, kind, seed, epoch, num_epochs, length, per_visit)
    return _shard(order, rank, world_size)


def _global_order(
    labels: np.ndarray, kind: str, seed: int, epoch: int, num_epochs: int, length: int, per_visit: int
) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=np.int64)
    shuffle_key = _hash2(_seed_key(seed, _DOMAIN_EPOCH_SHUFFLE), _u64(epoch))
    if kind == "uniform":
        return _permute(np.arange(length, dtype=np.int64), shuffle_key)
    num_classes = int(labels.max()) + 1
    order, offsets = _class_table(labels, num_classes)
    sizes = np.diff(offsets)
    present = np.flatnonzero(sizes > 0)
    base = _seed_key(seed, _DOMAIN_EPOCH_CLASS)
    if kind == "class_aware":
        cls, d = _class_aware_draws(present, seed, epoch, length, per_visit)
        return _draw(order, offsets, base, cls, d)
    quotas, firsts = _quota_schedule(sizes[present], kind, epoch, num_epochs, length)
    cls = np.repeat(present, quotas)
    d = np.repeat(firsts, quotas) + (np.arange(length) - np.repeat(np.cumsum(quotas) - quotas, quotas))
    return _permute(_draw(order, offsets, base, cls, d), shuffle_key)


def _class_aware_draws(
    present: np.ndarray, seed: int, epoch: int, length: int, per_visit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Official ClassAwareSampler stream: classes visited in a fresh random order per cycle, per_visit draws each.

    Epoch e covers visits e * V .. e * V + V - 1 of one endless stream (V = ceil(length / per_visit)), so the
    per-class permutations continue across epochs like the official persistent iterators.
    """
    p = present.size
    visits_per_epoch = -(-length // per_visit)
    v = epoch * visits_per_epoch + np.arange(visits_per_epoch, dtype=np.int64)
    cycles = v // p
    cls = np.empty(v.size, dtype=np.int64)
    cycle_key = _seed_key(seed, _DOMAIN_CLASS_CYCLE)
    for r in np.unique(cycles).tolist():
        rows = cycles == r
        cls[rows] = present[_permute(np.arange(p, dtype=np.int64), _hash2(cycle_key, _u64(r)))[v[rows] % p]]
    d = cycles[:, None] * per_visit + np.arange(per_visit, dtype=np.int64)[None, :]
    return np.repeat(cls, per_visit)[:length], d.ravel()[:length]


def _quota_schedule(
    sizes: np.ndarray, kind: str, epoch: int, num_epochs: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sample counts of this epoch and each class's first draw number (draws continue across epochs)."""
    if kind == "sqrt":
        quotas = _quotas(_sqrt_weights(sizes), length)
        return quotas, quotas * epoch
    firsts = np.zeros(sizes.size, dtype=np.int64)
    for t in range(min(epoch, num_epochs + 1)):  # quotas change every epoch up to T, then stay fixed
        times = epoch - num_epochs if t == num_epochs else 1
        firsts += _quotas(_progressive_weights(sizes, t, num_epochs), length) * times
    return _quotas(_progressive_weights(sizes, epoch, num_epochs), length), firsts


def _sqrt_weights(sizes: np.ndarray) -> list[int]:
    # Exact integer square roots of n_c * 2**32: portable where floating-point pow/sum orders are not.
    return [math.isqrt(int(n) << 32) for n in sizes.tolist()]


def _progressive_weights(sizes: np.ndarray, epoch: int, num_epochs: int) -> list[int]:
    """Kang et al. p_c(t) = (1 - t/T) n_c / N + (t/T) / P, scaled by T * N * P to integers (t capped at T)."""
    t = min(epoch, num_epochs)
    n, p = int(sizes.sum()), sizes.size
    if num_epochs * n * p >= 2**64:
        raise ValueError("num_epochs * len(labels) * number of classes must be below 2**64")
    return [(num_epochs - t) * int(c) * p + t * n for c in sizes.tolist()]


def _quotas(weights: list[int], length: int) -> np.ndarray:
    """Largest-remainder apportionment of ``length`` samples by integer weights; ties go to the lower class."""
    total = sum(weights)
    floors = [length * w // total for w in weights]
    remainders = [length * w % total for w in weights]
    leftover = length - sum(floors)
    order = sorted(range(len(weights)), key=lambda c: (-remainders[c], c))
    quotas = np.asarray(floors, dtype=np.int64)
    quotas[order[:leftover]] += 1
    return quotas


def _shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """DistributedSampler split: wrap-pad to a multiple of world_size, then take every world_size-th from rank."""
    length = order.size
    per_rank = -(-length // world_size)
    if length == 0:
        return order
    positions = np.arange(per_rank, dtype=np.int64) * world_size + rank
    return order[positions % length]


# ---------------------------------------------------------------------------------------------------------------
# Per-class counters.
# ---------------------------------------------------------------------------------------------------------------
def counts_from_logits(
    logits: np.ndarray, label: np.ndarray, num_classes: int, topk: int = 1, num_threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (correct, total) from (N, C) float logits: a sample is correct when its label ranks below topk.

    The rank of the label is the number of classes with a larger logit plus those with an equal logit and a lower
    index, so ties go to the lowest index exactly as torch/numpy argmax does. A row holding any non-finite logit
    (NaN, +inf or -inf) counts in ``total`` but never in ``correct``.

    Args:
        logits: (N, C) float16, float32 or float64 scores.
        label: (N,) integer labels in [0, C).
        num_classes: C, must equal logits.shape[1].
        topk: k in [1, C].
        num_threads: validated but unused here.
    """
    _check_count(num_threads, "num_threads", limit=1025)
    logits = np.asarray(logits)
    if logits.dtype.kind != "f" or logits.dtype.itemsize > 8:
        raise ValueError(f"logits must be a float16/32/64 array, got dtype {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D, got ndim={logits.ndim}")
    label = _as_int64(label, "label")
    if logits.shape[0] != label.size:
        raise ValueError(f"logits has {logits.shape[0]} rows but label has {label.size} entries")
    num_classes = _check_count(num_classes, "num_classes", positive=True, limit=_MAX_COUNT)
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits has {logits.shape[1]} columns but num_classes = {num_classes}")
    topk = _check_count(topk, "topk", positive=True, limit=num_classes + 1)
    _check_labels(label, num_classes)
    finite = np.isfinite(logits).all(axis=1)  # (N,)
    z_y = logits[np.arange(label.size), label][:, None]  # (N, 1)
    lower = np.arange(num_classes)[None, :] < label[:, None]  # (N, C)
    rank = (logits > z_y).sum(axis=1) + ((logits == z_y) & lower).sum(axis=1)
    total = np.bincount(label, minlength=num_classes)
    correct = np.bincount(label[(rank < topk) & finite], minlength=num_classes)
    return correct.astype(np.int64), total.astype(np.int64)
