"""The ``engine`` benchmark: ``bench_engine.py``'s sampler and counter measurements as a registered, runner-timed suite."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.bench_engine import (
    imagenet_lt_labels,
    memory_bandwidth,
    numpy_class_aware,
    numpy_with_replacement,
    official_class_aware,
    official_count_loop,
    python_count_loop,
    python_count_loop_numpy,
)
from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant

__all__ = ["FULL_POINTS", "QUICK_POINTS", "EngineSuite"]

#: ``calls`` caps (warm-up, repeats, rounds) per point; ``*_subset``: samples the Python loops really run (their
#: time is scaled linearly to ``n``, as ``bench_engine.py`` does).
FULL_POINTS = (
    {"name": "meta_sampling", "indices": 1_000_000, "m": 100, "calls": [1, 3, 2]},
    {"name": "epoch_order", "epoch": 45, "epochs": 90, "calls": [1, 5, 2]},
    {"name": "counting", "n": 10_000_000, "classes": 1000, "loop_subset": 100_000, "official_subset": 10_000,
     "bandwidth_mib": 400, "calls": [1, 3, 2]},
    {"name": "logits", "rows": 100_000, "classes": 1000, "bandwidth_mib": 400, "calls": [1, 5, 2]},
)
QUICK_POINTS = (
    {"name": "meta_sampling", "indices": 20_000, "m": 100, "calls": [1, 2, 1]},
    {"name": "epoch_order", "epoch": 1, "epochs": 2, "calls": [1, 2, 1]},
    {"name": "counting", "n": 100_000, "classes": 1000, "loop_subset": 10_000, "official_subset": 1_000,
     "bandwidth_mib": 16, "calls": [1, 2, 1]},
    {"name": "logits", "rows": 2_000, "classes": 100, "bandwidth_mib": 16, "calls": [1, 2, 1]},
)
VARIANTS = {
    "meta_sampling": ("cpp", "cpp_batch_calls", "official_python", "numpy_vectorised", "numpy_with_replacement"),
    "epoch_order": ("cpp", "cpp_class_aware", "cpp_sqrt", "cpp_progressive", "numpy_permutation"),
    "counting": ("cpp", "cpp_1thread", "numpy_bincount_total", "numpy_bincount_full", "python_loop_numpy",
                 "python_loop_tolist", "official_item_loop"),
    "logits": ("cpp", "numpy_argmax_counts"),
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
        Ratio("numpy.bincount (totals only) / C++ (no slower)", "numpy_bincount_total", "cpp", 1.0),
        Ratio("NumPy total + correct / C++", "numpy_bincount_full", "cpp"),
        Ratio("per-sample loop over NumPy arrays / C++", "python_loop_numpy", "cpp", 1000.0),
        Ratio("per-sample loop over .tolist() / C++", "python_loop_tolist", "cpp", 1000.0),
        Ratio("official .item() loop over torch tensors / C++", "official_item_loop", "cpp", 1000.0),
        Ratio("C++ 1 thread / auto threads", "cpp_1thread", "cpp", higher_is_better=False),
    ),
    "logits": (Ratio("NumPy argmax + class_counts / fused C++", "numpy_argmax_counts", "cpp"),),
}


@BENCHMARKS.register("engine")
class EngineSuite(Benchmark):
    """C++ engine functions against the Python and NumPy ways of doing the same, on ImageNet-LT-shaped data.

    Points: ``meta_sampling`` (10^6 class-balanced meta indices), ``epoch_order`` (every order kind),
    ``counting`` (per-class correct/total of 10^7 predictions, C = 1000), ``logits`` (fused top-1 counting of
    10^5 × 1000 logits). The baseline of every point is its C++ variant ``cpp``. The standalone script
    ``benchmarks/bench_engine.py`` prints the same measurements as one table.
    """

    name = "engine"
    description = "C++ meta sampler, epoch orders and class counters vs Python / NumPy"
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
        """``bench_engine.py``'s targets (how many times slower than C++ the alternatives are)."""
        return list(RATIOS[params["name"]])

    def setup(self, params: dict[str, Any]) -> None:
        """Builds the point's data and the callables of its variants."""
        try:
            from dnet_fast import sampling  # noqa: F401  (needs the built extension)
        except ImportError as exc:
            msg = f"dnet_fast._C not usable: {exc}"
            raise SkipVariant(msg) from exc
        self.params = params
        self._bytes: dict[str, int] = {}
        self._fns: dict[str, tuple[Callable[[], object], float]] = getattr(self, f"_{params['name']}")(params)

    def teardown(self) -> None:
        """Drops the data."""
        self._fns = {}

    def prepare(self, variant: str) -> Callable[[], object]:
        """The variant's callable (built in ``setup``)."""
        return self._fns[variant][0]

    def time_scale(self, variant: str) -> float:
        """Python loops run on a subset; their time is scaled linearly to the full size."""
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
            "numpy_with_replacement": (lambda: numpy_with_replacement(labels, count, rng), 1.0),
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
        from dnet_fast.metrics import class_counts
        from dnet_fast.sampling import _C

        n, c, sub, small = p["n"], p["classes"], p["loop_subset"], p["official_subset"]
        rng = np.random.default_rng(1)
        label = rng.integers(0, c, size=n)
        pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, c, size=n))
        self.units_per_call = n
        self._bytes = dict.fromkeys(VARIANTS["counting"], pred.nbytes + label.nbytes)
        self._bytes["numpy_bincount_total"] = label.nbytes  # reads the labels only
        self._bandwidth()
        return {
            "cpp": (lambda: class_counts(pred, label, c), 1.0),
            "cpp_1thread": (lambda: _C.class_counts(pred, label, c, 1), 1.0),
            "numpy_bincount_total": (lambda: np.bincount(label, minlength=c), 1.0),
            "numpy_bincount_full": (
                lambda: (np.bincount(label, minlength=c), np.bincount(label[pred == label], minlength=c)), 1.0,
            ),
            "python_loop_numpy": (lambda: python_count_loop_numpy(pred[:sub], label[:sub], c), n / sub),
            "python_loop_tolist": (lambda: python_count_loop(pred[:sub], label[:sub], c), n / sub),
            "official_item_loop": (lambda: official_count_loop(pred[:small], label[:small], c), n / small),
        }

    def _logits(self, p: dict[str, Any]) -> dict[str, tuple[Callable[[], object], float]]:
        from dnet_fast.metrics import class_counts, counts_from_logits

        rows, c = p["rows"], p["classes"]
        rng = np.random.default_rng(1)
        logits = rng.standard_normal((rows, c), dtype=np.float32)
        y = rng.integers(0, c, size=rows)
        self.units_per_call = rows
        self._bytes = dict.fromkeys(VARIANTS["logits"], logits.nbytes)
        self._bandwidth()
        return {
            "cpp": (lambda: counts_from_logits(logits, y, c), 1.0),
            "numpy_argmax_counts": (lambda: class_counts(logits.argmax(1), y, c), 1.0),
        }

    def _bandwidth(self) -> None:
        mib = self.params["bandwidth_mib"]
        self.bandwidth = memory_bandwidth(3, mib * 2**20)
        self.notes["bandwidth"] = f"numpy copy of {mib} MiB (read + write counted): {self.bandwidth:.1f} GB/s"

    def derived(self, point: dict[str, Any]) -> dict[str, Any]:
        """GB/s of input read per variant and its share of the measured copy bandwidth (counting points)."""
        if not self._bytes or not point["variants"]:
            return {}
        rows = []
        for name, v in point["variants"].items():
            gbs = self._bytes[name] / v["best_median_s"] / 1e9
            rows.append({"variant": f"`{name}`", "GB/s read": gbs, "% of copy bandwidth": 100 * gbs / self.bandwidth})
        return {"tables": [{"title": "Input throughput", "columns": ["variant", "GB/s read", "% of copy bandwidth"],
                            "rows": rows}]}
