"""Benchmark harness: timing, environment capture, atomic JSON, and the Benchmark base class with its registry."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dnet_fast import info
from dnet_fast.atomic import atomic_write_json
from dnet_fast.registry import Registry

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Profile",
    "Ratio",
    "SkipVariant",
    "Timing",
    "environment",
    "timeit",
    "write_json",
]


@dataclass(slots=True)
class Timing:
    """Wall time of repeated calls, in seconds.

    Attributes:
        median: median of ``samples``.
        min: fastest sample.
        max: slowest sample.
        iqr: interquartile range (q3 - q1) of ``samples``.
        samples: every timed call (warm-up excluded).
        clock: ``cuda_events`` or ``perf_counter``.
        setup_s: time of the caller's ``setup`` callable (build, compile, capture), never part of ``samples``.
        warmup_s: total time of the warm-up calls.
    """

    median: float
    min: float
    max: float
    iqr: float
    samples: list[float]
    clock: str
    setup_s: float | None = None
    warmup_s: float = 0.0

    @classmethod
    def from_samples(cls, samples: list[float], clock: str, **extra: Any) -> Timing:
        """Builds a Timing with the statistics of ``samples`` (seconds)."""
        if not samples:
            msg = "a Timing needs at least one sample"
            raise ValueError(msg)
        q1, q3 = np.percentile(samples, [25, 75])
        return cls(
            median=statistics.median(samples),
            min=min(samples),
            max=max(samples),
            iqr=float(q3 - q1),
            samples=list(samples),
            clock=clock,
            **extra,
        )

    def merged(self, other: Timing) -> Timing:
        """Pools the samples of two Timings (e.g. two rounds of the same variant); setup times add."""
        setup = (
            None
            if self.setup_s is None and other.setup_s is None
            else (self.setup_s or 0) + (other.setup_s or 0)
        )
        return Timing.from_samples(
            self.samples + other.samples,
            self.clock,
            setup_s=setup,
            warmup_s=self.warmup_s + other.warmup_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def _uses_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def _timed_call(fn: Callable[[], object], cuda: bool, sync: Callable[[], object] | None) -> float:
    """Seconds for one call: CUDA events around GPU work (they time the stream, not the launch), else perf_counter."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # sync point: reading the events
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def timeit(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    repeats: int = 7,
    sync: Callable[[], object] | None = None,
    device: torch.device | str | None = None,
    setup: Callable[[], object] | None = None,
    reset: Callable[[], object] | None = None,
) -> Timing:
    """Times ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Args:
        fn: the work to time; called with no arguments.
        warmup: untimed calls first (allocator, autotuning, lazy init).
        repeats: timed calls.
        sync: called after each call when timing with perf_counter (e.g. ``torch.cuda.synchronize``), so that
            asynchronous work is inside the measurement.
        device: where the work runs; a CUDA device switches the clock to CUDA events.
        setup: called once before the warm-up; its duration is reported as ``setup_s`` (build, compile, capture).
        reset: called after the warm-up, untimed, so that timing starts from a restored state.

    Returns:
        The Timing of the timed calls.
    """
    if repeats < 1 or warmup < 0:
        msg = f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}"
        raise ValueError(msg)
    cuda = _uses_cuda(device)
    setup_s = None
    if setup is not None:
        t0 = time.perf_counter()
        setup()
        if cuda:
            torch.cuda.synchronize()  # sync point: setup work belongs to setup_s
        setup_s = time.perf_counter() - t0
    warm = [_timed_call(fn, cuda, sync) for _ in range(warmup)]
    if reset is not None:
        reset()
    samples = [_timed_call(fn, cuda, sync) for _ in range(repeats)]
    return Timing.from_samples(
        samples, "cuda_events" if cuda else "perf_counter", setup_s=setup_s, warmup_s=float(sum(warm))
    )


# ----------------------------------------------------------------------------------------------------------
# Environment


def environment() -> dict[str, Any]:
    """``dnet_fast.info.environment()`` (the run directories' env.json) in the flat layout of benchmark results.

    Returns:
        A JSON-ready dict: machine/platform, CPU model and cores (total and usable), load average, torch threads,
        python/torch/numpy versions, CUDA version and GPU (or None), git commit and dirty flag, UTC date, and
        whether ``dnet_fast._C`` is built.
    """
    env = info.environment()
    cuda, git = env["cuda"], env["git"]
    gpu = None
    if cuda["available"]:
        gpu = {"name": cuda["device"], **{k: cuda[k] for k in ("count", "memory_gib", "capability", "cudnn")}}
    return {
        "date_utc": env["date"],
        "machine": env["machine"],
        "platform": env["platform"],
        "hostname": env["hostname"],
        "cpu_model": env["cpu"],
        "cpu_count": env["cpu_count"],
        "cpu_usable": env["cpu_usable"],
        "load_avg": env["load_avg"],
        "torch_threads": env["torch_threads"],
        "python": env["python"],
        "torch": env["torch"],
        "numpy": env["numpy"],
        "cuda": cuda["torch_cuda"],
        "gpu": gpu,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "dnet_fast": env["dnet_fast"],
        "dnet_fast_C": env["extension"],
    }


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Writes ``payload`` as indented JSON atomically (``dnet_fast.atomic``; objects JSON lacks become strings).

    Returns:
        The written path.
    """
    atomic_write_json(path, payload, indent=2, default=str)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Benchmark base class and registry


@dataclass(frozen=True, slots=True)
class Ratio:
    """A named ratio of two variants' median times, with an optional target.

    ``value = median(numerator) / median(denominator)``. With ``higher_is_better`` the ratio is a speed-up
    (slow baseline over fast variant) and passes when ``value >= target``; otherwise it is an overhead and passes
    when ``value <= target``.
    """

    name: str
    numerator: str
    denominator: str
    target: float | None = None
    higher_is_better: bool = True

    def evaluate(self, medians: dict[str, float]) -> dict[str, Any]:
        """The ratio's value and verdict for the given variant medians (None when a variant is missing)."""
        num, den = medians.get(self.numerator), medians.get(self.denominator)
        value = num / den if num is not None and den else None
        passed = None
        if value is not None and self.target is not None:
            passed = value >= self.target if self.higher_is_better else value <= self.target
        return {
            "name": self.name,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "value": value,
            "target": self.target,
            "op": ">=" if self.higher_is_better else "<=",
            "passed": passed,
        }


@dataclass(frozen=True, slots=True)
class Profile:
    """How a run is sized: ``quick`` (seconds, tiny shapes, CI) or ``full``; and the device it runs on."""

    quick: bool = False
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 7
    rounds: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class SkipVariant(Exception):
    """Raised by ``setup`` (whole grid point) or ``prepare`` (one variant) when it cannot run here; the message
    says why (e.g. a module that does not exist yet, no GPU) and is recorded in the results."""


class Benchmark:
    """Base class of a registered benchmark.

    A subclass declares a parameter grid and named variants; the runner calls ``setup(params)`` once per grid
    point, then for every variant ``prepare(variant)`` (timed as setup, e.g. model build or graph capture) which
    returns the callable to time, and finally ``teardown()``. Either may raise ``SkipVariant``. All variants of a grid point are measured in the same
    process, interleaved by round, so their ratios compare like with like.

    Attributes:
        name: registry name (set by the ``register`` decorator's argument).
        baseline: the variant every other one is compared with in the speed-up column.
        units_per_call: items (e.g. images) processed per call, for a throughput column; 0 = none.
        notes: facts found while preparing (e.g. a fallback taken), copied into the results of the grid point.
    """

    name: ClassVar[str] = ""
    notes: dict[str, str]
    description: ClassVar[str] = ""
    baseline: ClassVar[str] = ""
    units_per_call: int = 0
    unit_name: ClassVar[str] = "img"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """The parameter points to measure for ``profile``; each a JSON-ready dict."""
        raise NotImplementedError

    def variants(self, params: dict[str, Any]) -> list[str]:
        """Variant names measured at ``params`` (the baseline first)."""
        raise NotImplementedError

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002  (default ignores params)
        """Ratios (with targets) reported for ``params``; defaults to every variant against the baseline."""
        return []

    def setup(self, params: dict[str, Any]) -> None:
        """Builds what every variant shares (data, reference weights); resets ``notes``."""
        raise NotImplementedError

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds ``variant`` from the shared state and returns the callable to time (one iteration)."""
        raise NotImplementedError

    def run(self) -> None:
        """Runs the prepared variant once (convenience for interactive use)."""
        self._fn()

    def use(self, variant: str) -> None:
        """Prepares ``variant`` for ``run()``."""
        self._fn = self.prepare(variant)

    def teardown(self) -> None:
        """Frees the shared state."""


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")
