"""The ``engine`` benchmark: the C++ meta sampler, epoch orders and per-class counters against Python and NumPy.

Points: ``meta_sampling`` (10^6 class-balanced meta indices), ``epoch_order`` (every order kind), ``counting``
(per-class correct/total straight from 10^5 × 1000 float32 logits: the fused C++ ``counts_from_logits`` against the
device counter's torch ops on the CPU, NumPy and the released code's per-sample ``.item()`` loop), and ``acc_pass``
(the engine's A_C pass on the CPU — ResNet-32 eval forwards over a val set — with the host C++ counter the engine
uses on CPU versus the device counter, so the counting's share of a real pass is visible). The baseline of every
point is its C++ variant ``cpp``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, timeit

__all__ = [
    "FULL_POINTS",
    "QUICK_POINTS",
    "EngineBenchmark",
    "RandomCycleIter",
    "imagenet_lt_labels",
    "numpy_class_aware",
    "official_class_aware",
]

#: ``calls`` caps (warm-up, repeats, rounds) per point; ``official_subset``: rows the per-sample loop really runs
#: (its time is scaled linearly to ``rows``).
FULL_POINTS = (
    {"name": "meta_sampling", "indices": 1_000_000, "m": 100, "calls": [1, 3, 2]},
    {"name": "epoch_order", "epoch": 45, "epochs": 90, "calls": [1, 5, 2]},
    {"name": "counting", "rows": 100_000, "classes": 1000, "official_subset": 2_000, "bandwidth_mib": 400,
     "calls": [1, 5, 2]},
    {"name": "acc_pass", "images": 2_500, "classes": 100, "batch": 256, "calls": [1, 3, 2]},
)
QUICK_POINTS = (
    {"name": "meta_sampling", "indices": 20_000, "m": 100, "calls": [1, 2, 1]},
    {"name": "epoch_order", "epoch": 1, "epochs": 2, "calls": [1, 2, 1]},
    {"name": "counting", "rows": 2_000, "classes": 100, "official_subset": 200, "bandwidth_mib": 16,
     "calls": [1, 2, 1]},
    {"name": "acc_pass", "images": 64, "classes": 10, "batch": 32, "calls": [1, 2, 1]},
)
VARIANTS = {
    "meta_sampling": ("cpp", "cpp_batch_calls", "official_python", "numpy_vectorised", "numpy_with_replacement"),
    "epoch_order": ("cpp", "cpp_class_aware", "cpp_sqrt", "cpp_progressive", "numpy_permutation"),
    "counting": ("cpp", "cpp_1thread", "device_counter", "numpy_argmax_bincount", "official_item_loop"),
    "acc_pass": ("cpp", "device_counter"),
}
RATIOS = {
    "meta_sampling": (
        Ratio("official Python ClassAwareSampler / C++", "official_python", "cpp", 50.0),
        Ratio("best vectorised NumPy (same semantics) / C++", "numpy_vectorised", "cpp", 5.0),
        Ratio("NumPy with replacement (looser) / C++", "numpy_with_replacement", "cpp"),
        Ratio("10^4 batch() calls / one batches() call", "cpp_batch_calls", "cpp", higher_is_better=False),
    ),
    "epoch_order": (Ratio("progressive / uniform", "cpp_progressive", "cpp", higher_is_better=False),),
    "counting": (
        Ratio("device counter's torch ops on the CPU / C++", "device_counter", "cpp", 1.0),
        Ratio("NumPy argmax + bincount / C++ (no slower)", "numpy_argmax_bincount", "cpp", 1.0),
        Ratio("released code's per-sample .item() loop / C++", "official_item_loop", "cpp", 1000.0),
        Ratio("1 thread / auto threads", "cpp_1thread", "cpp", higher_is_better=False),
    ),
    "acc_pass": (Ratio("A_C pass with the device counter / with the C++ counter", "device_counter", "cpp"),),
}


# ----------------------------------------------------------------------------------------------------------
# Data and baselines


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
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), counts))


class RandomCycleIter:
    """The official ClassAwareSampler helper (``RandomCycleIter``): cycle through ``data``, reshuffled in place by
    ``rng`` at the start of each pass (the released code used the global unseeded ``random``; a seeded private
    generator keeps this reproducible). The stage-2 benchmark's official sampler uses it too."""

    def __init__(self, data: Iterable[int], rng: random.Random) -> None:
        self.data_list, self.rng = list(data), rng
        self.i = len(self.data_list) - 1

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        self.i += 1
        if self.i == len(self.data_list):
            self.i = 0
            self.rng.shuffle(self.data_list)
        return self.data_list[self.i]


def official_class_aware(labels: np.ndarray, count: int, seed: int = 0) -> list[int]:
    """Official-style sampler (Kang et al. / Difficulty-Net): next class from a cyclic iterator, one sample each."""
    rng = random.Random(seed)
    cls_data: list[list[int]] = [[] for _ in range(int(labels.max()) + 1)]
    for i, y in enumerate(labels.tolist()):
        cls_data[y].append(i)
    class_iter = RandomCycleIter(list(range(len(cls_data))), rng)
    data_iters = [RandomCycleIter(x, rng) for x in cls_data]
    return [next(data_iters[next(class_iter)]) for _ in range(count)]


def numpy_class_aware(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Best vectorised NumPy version of the same stream (classes in shuffled cycles, per-class passes without
    replacement): one segmented sort draws every per-class pass at once."""
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
    pos = seg_start[first_seg[classes] + r // sizes[classes]] + r % sizes[classes]
    return shuffled[pos].ravel()[:count]


def _numpy_with_replacement(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Looser NumPy baseline (per-class draws *with* replacement), for reference only."""
    num_classes = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cycles = -(-count // num_classes)
    c = rng.permuted(np.tile(np.arange(num_classes), (cycles, 1)), axis=1).ravel()[:count]
    return order[starts[c] + (rng.random(count) * sizes[c]).astype(np.int64)]


def _numpy_counts(logits: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = logits.argmax(1)
    return (np.bincount(label[pred == label], minlength=num_classes), np.bincount(label, minlength=num_classes))


def _official_item_loop(logits: Any, label: Any, num_classes: int) -> tuple[list[int], list[int]]:
    """The released code's accuracy loop: argmax on the tensor, then ``.item()`` per sample (a host sync each)."""
    pred = logits.argmax(1)
    correct, total = [0] * num_classes, [0] * num_classes
    for i in range(label.shape[0]):
        y = int(label[i].item())
        total[y] += 1
        correct[y] += int((pred[i] == label[i]).item())
    return correct, total


def memory_bandwidth(nbytes: int) -> float:
    """GB/s of a large NumPy copy, counting the read and the write."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    return 2 * nbytes / timeit(lambda: np.copyto(dst, src), warmup=1, repeats=3).median / 1e9


@BENCHMARKS.register("engine")
class EngineBenchmark(Benchmark):
    """C++ meta sampler, epoch orders and class counters vs Python / NumPy / torch (see the module docstring)."""

    name = "engine"
    description = "C++ meta sampler, epoch orders and class counters vs Python / NumPy / torch"
    baseline = "cpp"
    unit_name = "item"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """The four points (``--quick``: small sizes)."""
        return [dict(p) for p in (QUICK_POINTS if profile.quick else FULL_POINTS)]

    def profile_for(self, params: dict[str, Any], profile: Profile) -> Profile:
        """The point's ``calls`` caps (the 1.5 s Python sampler need not run 21 times)."""
        w, r, n = params["calls"]
        return dataclasses.replace(
            profile, warmup=min(profile.warmup, w), repeats=min(profile.repeats, r), rounds=min(profile.rounds, n)
        )

    def variants(self, params: dict[str, Any]) -> list[str]:
        """C++ first."""
        return list(VARIANTS[params["name"]])

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:
        """How many times slower than C++ the alternatives are, with the targets of the engine issue."""
        return list(RATIOS[params["name"]])

    def setup(self, params: dict[str, Any]) -> None:
        """Builds the point's data and the callables of its variants."""
        self.params = params
        self._bytes: int = 0
        self._fns: dict[str, tuple[Callable[[], object], float]] = getattr(self, f"_{params['name']}")(params)

    def teardown(self) -> None:
        """Drops the data."""
        self._fns = {}

    def prepare(self, variant: str) -> Callable[[], object]:
        """The variant's callable (built in ``setup``)."""
        return self._fns[variant][0]

    def time_scale(self, variant: str) -> float:
        """Per-sample Python loops run on a subset; their time is scaled linearly to the full size."""
        return self._fns[variant][1]

    # -- points -----------------------------------------------------------------------------------------

    def _meta_sampling(self, p: dict[str, Any]) -> dict[str, tuple[Callable[[], object], float]]:
        from dnet_fast.sampling import MetaBatchSampler

        labels, count, m = imagenet_lt_labels(), p["indices"], p["m"]
        sampler, rng = MetaBatchSampler(labels, seed=0), np.random.default_rng(0)
        self.units_per_call = count
        self.notes["data"] = f"ImageNet-LT-shaped labels (1,000 classes, {labels.size:,}); {count:,} indices per call"
        return {
            "cpp": (lambda: sampler.batches(0, count // m, m), 1.0),
            "cpp_batch_calls": (lambda: [sampler.batch(s, m) for s in range(count // m)], 1.0),
            "official_python": (lambda: official_class_aware(labels, count), 1.0),
            "numpy_vectorised": (lambda: numpy_class_aware(labels, count, rng), 1.0),
            "numpy_with_replacement": (lambda: _numpy_with_replacement(labels, count, rng), 1.0),
        }

    def _epoch_order(self, p: dict[str, Any]) -> dict[str, tuple[Callable[[], object], float]]:
        from dnet_fast.sampling import epoch_order

        labels, rng = imagenet_lt_labels(), np.random.default_rng(0)
        self.units_per_call = labels.size

        def order(kind: str) -> Callable[[], object]:
            return lambda: epoch_order(labels, kind, seed=0, epoch=p["epoch"], num_epochs=p["epochs"])

        fns = {"cpp": (order("uniform"), 1.0)}
        fns |= {f"cpp_{k}": (order(k), 1.0) for k in ("class_aware", "sqrt", "progressive")}
        fns["numpy_permutation"] = (lambda: rng.permutation(labels.size), 1.0)
        self.notes["data"] = f"ImageNet-LT labels, epoch {p['epoch']} of {p['epochs']}; `cpp` = uniform order"
        return fns

    def _counting(self, p: dict[str, Any]) -> dict[str, tuple[Callable[[], object], float]]:
        import torch

        from dnet_fast.metrics import DeviceClassCounter, counts_from_logits
        from dnet_fast.sampling import _C

        rows, c, sub = p["rows"], p["classes"], p["official_subset"]
        rng = np.random.default_rng(1)
        logits = rng.standard_normal((rows, c), dtype=np.float32)
        label = rng.integers(0, c, size=rows)
        logits[np.arange(rows), label] += np.where(rng.random(rows) < 0.7, 10.0, 0.0).astype(np.float32)
        z, y = torch.from_numpy(logits), torch.from_numpy(label)
        device = DeviceClassCounter(c, "cpu")
        self.units_per_call, self._bytes = rows, logits.nbytes
        self._bandwidth()
        return {
            "cpp": (lambda: counts_from_logits(logits, label, c), 1.0),
            "cpp_1thread": (lambda: _C.counts_from_logits(logits, label, c, 1, 1), 1.0),
            "device_counter": (lambda: device.update(z, y), 1.0),
            "numpy_argmax_bincount": (lambda: _numpy_counts(logits, label, c), 1.0),
            "official_item_loop": (lambda: _official_item_loop(z[:sub], y[:sub], c), rows / sub),
        }

    def _acc_pass(self, p: dict[str, Any]) -> dict[str, tuple[Callable[[], object], float]]:
        import torch

        from dnet_fast.config import TrainConfig
        from dnet_fast.evaluation import class_accuracy
        from dnet_fast.metrics import DeviceClassCounter, HostClassCounter
        from dnet_fast.models import build_model

        g = torch.Generator().manual_seed(0)
        images = torch.randn(p["images"], 3, 32, 32, generator=g)
        labels = torch.arange(p["images"]) % p["classes"]
        torch.manual_seed(0)
        cfg = TrainConfig()
        model = build_model(cfg.model, p["classes"]).eval()
        bs = p["batch"]

        def run(make_counter: Callable[[], object]) -> Callable[[], object]:
            def one_pass() -> object:
                batches = ((images[i : i + bs], labels[i : i + bs]) for i in range(0, len(labels), bs))
                return class_accuracy(model, batches, p["classes"], cfg, torch.device("cpu"), counter=make_counter())

            return one_pass

        self.units_per_call = p["images"]
        self.notes["data"] = f"CIFAR ResNet-32, {p['images']} val images of 32 px, batch {bs}, {p['classes']} classes"
        return {
            "cpp": (run(lambda: HostClassCounter(p["classes"])), 1.0),
            "device_counter": (run(lambda: DeviceClassCounter(p["classes"], "cpu")), 1.0),
        }

    def _bandwidth(self) -> None:
        mib = self.params["bandwidth_mib"]
        self.bandwidth = memory_bandwidth(mib * 2**20)
        self.notes["bandwidth"] = f"numpy copy of {mib} MiB (read + write counted): {self.bandwidth:.1f} GB/s"

    def derived(self, point: dict[str, Any]) -> dict[str, Any]:
        """GB/s of logits read per variant and its share of the measured copy bandwidth (counting point)."""
        if not self._bytes or not point["variants"]:
            return {}
        rows = []
        for name, v in point["variants"].items():
            gbs = self._bytes / v["best_median_s"] / 1e9
            rows.append({"variant": f"`{name}`", "GB/s read": gbs, "% of copy bandwidth": 100 * gbs / self.bandwidth})
        return {"tables": [{"title": "Input throughput", "columns": ["variant", "GB/s read", "% of copy bandwidth"],
                            "rows": rows}]}
