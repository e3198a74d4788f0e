"""Paired comparison of two sets of runs matched by seed: mean difference B − A with a Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.rundir import load_results, run_label, run_seed
from dnet_fast.stats import t_quantile

__all__ = ["METRICS", "Comparison", "MetricDiff", "compare_runs", "format_comparison", "paired_interval"]

METRICS = ("top1", "many", "medium", "few")  # keys of results.json "test"
_NAMES = {"top1": "top-1", "many": "many", "medium": "medium", "few": "few"}


@dataclass(frozen=True)
class MetricDiff:
    """B − A for one metric over the paired seeds where both runs have a value, in percentage points."""

    metric: str
    n: int  # paired seeds with a value on both sides (an empty shot group has none)
    mean: float | None  # mean difference, None when n = 0
    low: float | None  # lower end of the confidence interval, None when n < 2
    high: float | None  # upper end, None when n < 2

    @property
    def distinguishable(self) -> bool | None:
        """Whether the interval excludes 0; None without an interval."""
        if self.low is None or self.high is None:
            return None
        return not self.low <= 0.0 <= self.high


@dataclass(frozen=True)
class Comparison:
    """The result of `compare_runs`."""

    a_label: str  # method(s) of the A runs
    b_label: str
    seeds: tuple[int, ...]  # seeds present on both sides, sorted
    unmatched: tuple[str, ...]  # "path (seed s)" of runs without a partner, left out
    metrics: tuple[MetricDiff, ...]
    confidence: float  # of the two-sided intervals, e.g. 0.95

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``), intervals as ``[low, high]`` or null."""
        metrics = {}
        for m in self.metrics:
            ci = None if m.low is None else [m.low, m.high]
            metrics[m.metric] = {"n": m.n, "mean_diff_pp": m.mean, "ci_pp": ci,
                                 "distinguishable": m.distinguishable}
        return {"difference": "B - A, percentage points", "interval": f"{self.confidence:g} Student-t",
                **{k: v for k, v in asdict(self).items() if k != "metrics"}, "metrics": metrics}


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t confidence interval.

    mean ± t_{(1+confidence)/2, n−1} · s / √n, with s the sample standard deviation (ddof = 1).

    Args:
        diffs: (n,) differences, n >= 2.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        (mean, low, high).
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        msg = f"a confidence interval needs at least 2 paired differences, got {d.size}"
        raise ValueError(msg)
    mean = float(d.mean())
    half = t_quantile((1.0 + confidence) / 2.0, d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def _by_seed(runs: Sequence[str | Path], side: str) -> dict[int, tuple[str, dict[str, Any]]]:
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    for run in runs:
        results = load_results(run)
        seed = run_seed(results, run)
        if seed in out:
            msg = f"{side} runs {out[seed][0]} and {run} have the same seed {seed}; pairing would be ambiguous"
            raise ValueError(msg)
        out[seed] = (str(run), results)
    return out


def _label(side: dict[int, tuple[str, dict[str, Any]]]) -> str:
    labels = dict.fromkeys(run_label(results, with_lambda=True) for _, results in side.values())
    return " / ".join(labels)


def _metric_diff(metric: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]], confidence: float) -> MetricDiff:
    diffs = [100.0 * (b["test"][metric] - a["test"][metric]) for a, b in pairs
             if a["test"].get(metric) is not None and b["test"].get(metric) is not None]
    if len(diffs) < 2:
        return MetricDiff(metric, len(diffs), float(np.mean(diffs)) if diffs else None, None, None)
    return MetricDiff(metric, len(diffs), *paired_interval(diffs, confidence))


def compare_runs(a_runs: Sequence[str | Path], b_runs: Sequence[str | Path], *,
                 confidence: float = 0.95) -> Comparison:
    """Pairs A and B runs by ``config.run.seed`` and summarises B − A per test metric.

    Args:
        a_runs: finished run directories of method A.
        b_runs: finished run directories of method B.
        confidence: coverage of the intervals.

    Raises:
        ValueError: two runs of one side share a seed, a run is unfinished, or no seed is on both sides.
    """
    a, b = _by_seed(a_runs, "A"), _by_seed(b_runs, "B")
    seeds = sorted(a.keys() & b.keys())
    unmatched = tuple(f"{path} (seed {seed})" for side in (a, b) for seed, (path, _) in sorted(side.items())
                      if seed not in seeds)
    if not seeds:
        msg = f"no seed has a run on both sides (A seeds {sorted(a)}, B seeds {sorted(b)})"
        raise ValueError(msg)
    pairs = [(a[s][1], b[s][1]) for s in seeds]
    metrics = tuple(_metric_diff(m, pairs, confidence) for m in METRICS)
    return Comparison(_label(a), _label(b), tuple(seeds), unmatched, metrics, confidence)


def _verdict(m: MetricDiff) -> str:
    if m.n == 0:
        return "no paired values"
    if m.distinguishable is None:
        return "n < 2: no interval"
    if not m.distinguishable:
        return "not distinguishable (interval covers 0)"
    return "B higher" if m.mean > 0 else "B lower"


def format_comparison(c: Comparison) -> str:
    """The text printed by ``dnet-fast compare``: a Markdown table and what was left out."""
    pct = f"{100 * c.confidence:g} %"
    lines = [f"A: {c.a_label}", f"B: {c.b_label}",
             f"paired by seed ({len(c.seeds)}: {', '.join(map(str, c.seeds))}); B − A in percentage points, "
             f"mean over the paired seeds with a {pct} Student-t confidence interval",
             "", f"| metric | n | B − A (pp) | {pct} CI (pp) | verdict |", "|---|---|---|---|---|"]
    for m in c.metrics:
        mean = "n/a" if m.mean is None else f"{m.mean:+.2f}"
        ci = "n/a" if m.low is None else f"[{m.low:+.2f}, {m.high:+.2f}]"
        lines.append(f"| {_NAMES[m.metric]} | {m.n} | {mean} | {ci} | {_verdict(m)} |")
    if c.unmatched:
        lines += ["", "left out (no run with the same seed on the other side): " + ", ".join(c.unmatched)]
    return "\n".join(lines)
