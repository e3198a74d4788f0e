"""C++ engine benchmarks: meta-batch sampling and per-class counting against Python and NumPy, in one run.

Run: ``python benchmarks/bench_engine.py [--quick] [--json out.json]``. Prints a markdown table; every ratio is
computed from medians measured in this same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from dnet_fast.metrics import class_counts, counts_from_logits
from dnet_fast.sampling import MetaBatchSampler, epoch_order

__all__ = ["imagenet_lt_labels", "main"]


def imagenet_lt_labels(seed: int = 0) -> np.ndarray:
    """ImageNet-LT-shaped labels: 1,000 classes, 115,846 samples, counts 1,280 .. 5 on an exponential profile.

    n_i = 5 + 1275 * r**i with r fitted so the counts sum to 115,846; the rounding residual goes to the head.
    """
    target, classes = 115_846, 1000
    lo, hi = 0.9, 0.99999
    for _ in range(100):  # bisection on the decay rate
        r = (lo + hi) / 2
        total = np.round(5 + 1275 * r ** np.arange(classes)).sum()
        lo, hi = (r, hi) if total < target else (lo, r)
    counts = np.round(5 + 1275 * r ** np.arange(classes)).astype(np.int64)
    counts[1 : 1 + abs(target - counts.sum())] += np.sign(target - counts.sum())
    assert counts.sum() == target
    assert (counts.max(), counts.min()) == (1280, 5)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), counts))


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# Baselines.
# ---------------------------------------------------------------------------------------------------------------
class RandomCycleIter:
    """The official ClassAwareSampler helper: cycle through a list, reshuffling with python ``random`` per pass."""

    def __init__(self, data: list[int]) -> None:
        self.data_list = list(data)
        self.length = len(self.data_list)
        self.i = self.length - 1

    def __next__(self) -> int:
        self.i += 1
        if self.i == self.length:
            self.i = 0
            random.shuffle(self.data_list)
        return self.data_list[self.i]


def official_class_aware(labels: np.ndarray, count: int) -> list[int]:
    """Official-style sampler (Kang et al. / Difficulty-Net): next class from a cyclic iterator, one sample each."""
    num_classes = int(labels.max()) + 1
    cls_data = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels.tolist()):
        cls_data[y].append(i)
    class_iter = RandomCycleIter(list(range(num_classes)))
    data_iters = [RandomCycleIter(x) for x in cls_data]
    return [next(data_iters[next(class_iter)]) for _ in range(count)]


def numpy_class_aware(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Best vectorised NumPy version of the same stream (classes in shuffled cycles, per-class passes without
    replacement): one segmented sort draws every per-class pass at once.
    """
    num_classes = int(labels.max()) + 1
    cycles = -(-count // num_classes)
    order = np.argsort(labels, kind="stable")  # members grouped by class
    sizes = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    classes = rng.permuted(np.tile(np.arange(num_classes), (cycles, 1)), axis=1)  # (cycles, C) visiting order
    passes = -(-cycles // sizes)  # passes each class needs
    # One segment per (class, pass): member offsets repeated per pass, sorted by (segment, random key).
    seg_class = np.repeat(np.arange(num_classes), passes)
    seg_len = sizes[seg_class]
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    seg_id = np.repeat(np.arange(seg_class.size), seg_len)
    member = np.arange(seg_len.sum()) - np.repeat(seg_start, seg_len)
    perm = np.argsort(seg_id + rng.random(seg_id.size))  # segmented shuffle
    shuffled = order[starts[seg_class[seg_id]] + member[perm]]
    first_seg = np.concatenate([[0], np.cumsum(passes)[:-1]])  # each class's first segment
    r = np.broadcast_to(np.arange(cycles)[:, None], classes.shape)  # draw number of class c in cycle r is r
    c = classes
    pos = seg_start[first_seg[c] + r // sizes[c]] + r % sizes[c]
    return shuffled[pos].ravel()[:count]


def numpy_with_replacement(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Looser NumPy baseline (per-class draws *with* replacement), for reference only."""
    num_classes = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cycles = -(-count // num_classes)
    c = rng.permuted(np.tile(np.arange(num_classes), (cycles, 1)), axis=1).ravel()[:count]
    return order[starts[c] + (rng.random(count) * sizes[c]).astype(np.int64)]


def python_count_loop_numpy(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """The plain per-sample loop over the NumPy arrays as an evaluation script writes it."""
    correct, total = np.zeros(num_classes, dtype=np.int64), np.zeros(num_classes, dtype=np.int64)
    for p, y in zip(pred, label, strict=True):
        total[y] += 1
        correct[y] += p == y
    return correct, total


def python_count_loop(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    correct, total = [0] * num_classes, [0] * num_classes
    for p, y in zip(pred.tolist(), label.tolist(), strict=True):
        total[y] += 1
        correct[y] += p == y
    return correct, total


def official_count_loop(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    """The released code's accuracy loop: index the torch tensors per sample and ``.item()`` each (a host sync)."""
    import torch

    pred_t, label_t = torch.from_numpy(pred), torch.from_numpy(label)
    correct, total = [0] * num_classes, [0] * num_classes
    for i in range(label_t.shape[0]):
        y = int(label_t[i].item())
        total[y] += 1
        correct[y] += int((pred_t[i] == label_t[i]).item())
    return correct, total


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks.
# ---------------------------------------------------------------------------------------------------------------
def bench_sampling(repeats: int, rows: list[dict]) -> None:
    labels = imagenet_lt_labels()
    count, m = 1_000_000, 100
    sampler = MetaBatchSampler(labels, seed=0)
    rng = np.random.default_rng(0)
    t_ours = timed(lambda: sampler.batches(0, count // m, m), repeats)
    t_ours_calls = timed(lambda: [sampler.batch(s, m) for s in range(count // m)], max(1, repeats // 2))
    random.seed(0)
    t_official = timed(lambda: official_class_aware(labels, count), 1)
    t_numpy = timed(lambda: numpy_class_aware(labels, count, rng), repeats)
    t_loose = timed(lambda: numpy_with_replacement(labels, count, rng), repeats)
    rows += [
        {"bench": "meta 1e6 idx: C++ batches(k=10^4, m=100)", "seconds": t_ours, "ratio": 1.0},
        {
            "bench": "meta 1e6 idx: C++ batch() x 10^4 calls",
            "seconds": t_ours_calls,
            "ratio": t_ours_calls / t_ours,
        },
        {
            "bench": "meta 1e6 idx: official Python ClassAwareSampler",
            "seconds": t_official,
            "ratio": t_official / t_ours,
            "target": ">= 50x",
        },
        {
            "bench": "meta 1e6 idx: NumPy vectorised (same semantics)",
            "seconds": t_numpy,
            "ratio": t_numpy / t_ours,
            "target": ">= 5x",
        },
        {
            "bench": "meta 1e6 idx: NumPy with replacement (looser)",
            "seconds": t_loose,
            "ratio": t_loose / t_ours,
        },
    ]
    for kind in ("uniform", "class_aware", "sqrt", "progressive"):
        t = timed(lambda kind=kind: epoch_order(labels, kind, seed=0, epoch=45, num_epochs=90), repeats)
        rows.append({"bench": f"epoch_order {kind} (ImageNet-LT, epoch 45)", "seconds": t})
    t_perm = timed(lambda: rng.permutation(labels.size), repeats)
    rows.append({"bench": "numpy rng.permutation(115846) (reference)", "seconds": t_perm})


def bench_counting(repeats: int, rows: list[dict], n: int) -> float:
    rng = np.random.default_rng(1)
    num_classes = 1000
    label = rng.integers(0, num_classes, size=n)
    pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, num_classes, size=n))
    nbytes = pred.nbytes + label.nbytes
    t_ours = timed(lambda: class_counts(pred, label, num_classes), repeats)
    from dnet_fast.sampling import _C

    t_one = timed(lambda: _C.class_counts(pred, label, num_classes, 1), repeats)
    t_bincount = timed(lambda: np.bincount(label, minlength=num_classes), repeats)
    t_np_full = timed(
        lambda: (
            np.bincount(label, minlength=num_classes),
            np.bincount(label[pred == label], minlength=num_classes),
        ),
        repeats,
    )
    subset = n // 100
    t_loop = timed(lambda: python_count_loop(pred[:subset], label[:subset], num_classes), 1) * (n / subset)
    t_loop_np = timed(lambda: python_count_loop_numpy(pred[:subset], label[:subset], num_classes), 1) * (
        n / subset
    )
    small = n // 1000  # the tensor loop is ~10x slower still: time 1e4 samples and scale
    t_official = timed(lambda: official_count_loop(pred[:small], label[:small], num_classes), 1) * (n / small)
    gbs = lambda t: nbytes / t / 1e9  # noqa: E731
    rows += [
        {
            "bench": f"count {n:.0e} preds, C=1000: C++ class_counts (auto threads)",
            "seconds": t_ours,
            "ratio": 1.0,
            "GB/s": gbs(t_ours),
        },
        {
            "bench": "count: C++ class_counts, 1 thread",
            "seconds": t_one,
            "ratio": t_one / t_ours,
            "GB/s": gbs(t_one),
        },
        {
            "bench": "count: numpy.bincount(label) (total only)",
            "seconds": t_bincount,
            "ratio": t_bincount / t_ours,
            "target": ">= 1x",
            "GB/s": label.nbytes / t_bincount / 1e9,
        },
        {"bench": "count: numpy bincount total + correct", "seconds": t_np_full, "ratio": t_np_full / t_ours},
        {
            "bench": f"count: Python loop over NumPy arrays (timed on {subset:.0e}, scaled x{n // subset})",
            "seconds": t_loop_np,
            "ratio": t_loop_np / t_ours,
            "target": ">= 1000x",
        },
        {
            "bench": f"count: official-style loop over torch tensors, .item() per sample (timed on {small:.0e}, "
            f"scaled x{n // small})",
            "seconds": t_official,
            "ratio": t_official / t_ours,
            "target": ">= 1000x",
        },
        {
            "bench": f"count: Python loop over .tolist() (timed on {subset:.0e}, scaled x{n // subset})",
            "seconds": t_loop,
            "ratio": t_loop / t_ours,
            "target": ">= 1000x",
        },
    ]
    rows_logits = 100_000
    logits = rng.standard_normal((rows_logits, num_classes), dtype=np.float32)
    y = rng.integers(0, num_classes, size=rows_logits)
    t_fused = timed(lambda: counts_from_logits(logits, y, num_classes), repeats)
    t_np = timed(lambda: class_counts(logits.argmax(1), y, num_classes), repeats)
    rows += [
        {
            "bench": "logits 1e5 x 1000 f32: C++ counts_from_logits",
            "seconds": t_fused,
            "ratio": 1.0,
            "GB/s": logits.nbytes / t_fused / 1e9,
        },
        {
            "bench": "logits: numpy argmax + class_counts",
            "seconds": t_np,
            "ratio": t_np / t_fused,
            "GB/s": logits.nbytes / t_np / 1e9,
        },
    ]
    return nbytes


def memory_bandwidth(repeats: int, nbytes: int = 400 * 2**20) -> float:
    """GB/s of a large numpy copy, counting the read and the write."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t = timed(lambda: np.copyto(dst, src), repeats)
    return 2 * nbytes / t / 1e9


def main(argv: list[str] | None = None) -> int:
    """Run every engine benchmark and print a markdown table (optionally JSON)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1e6 predictions and 3 repeats")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    rows: list[dict] = []
    bandwidth = memory_bandwidth(repeats)
    bench_sampling(repeats, rows)
    bench_counting(repeats, rows, 1_000_000 if args.quick else 10_000_000)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared), "
        f"python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    print(f"memory bandwidth (numpy copy, read + write): {bandwidth:.1f} GB/s\n")
    print("| benchmark | median ms | ratio (x slower than C++) | target | GB/s | % of copy bandwidth |")
    print("|---|---:|---:|---|---:|---:|")
    for row in rows:
        ratio = f"{row['ratio']:.1f}" if "ratio" in row else ""
        gbs = f"{row['GB/s']:.2f}" if "GB/s" in row else ""
        pct = f"{100 * row['GB/s'] / bandwidth:.0f}%" if "GB/s" in row else ""
        print(
            f"| {row['bench']} | {1e3 * row['seconds']:.2f} | {ratio} | {row.get('target', '')} | {gbs} | {pct} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_GBps": bandwidth, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
