"""``dnet-fast plot``: the paper's analysis figures (Figs. 2–4) and per-run diagnostics as PNG files.

Each figure is a pure ``*_data`` function (run files → arrays, tested against the files) and a thin ``render_*``
function (arrays → PNG). matplotlib is imported only when rendering, through ``matplotlib.figure.Figure`` (no
pyplot, no global backend state); every PNG is written through `dnet_fast.atomic`, so a failed render leaves the
previous file intact.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.atomic import atomic_path
from dnet_fast.data.groups import FEW_THRESHOLD, GROUPS, MANY_THRESHOLD, group_accuracies, shot_groups
from dnet_fast.history import History, read_history
from dnet_fast.rundir import load_results, read_metrics, run_label

__all__ = [
    "FIGURES",
    "ClassAccuracy",
    "Curve",
    "PlotReport",
    "Run",
    "SortedDifficulty",
    "TrainingCurves",
    "WeightPanel",
    "class_accuracy_data",
    "curves_data",
    "difficulty_data",
    "entropy_data",
    "figure_paths",
    "load_runs",
    "plot_runs",
    "representative_classes",
    "weights_data",
]

_TAG_CHARS = 60  # longer run-name tags are shortened and made unique with a hash
_DPI = 120


@dataclass(frozen=True, eq=False)
class Run:
    """One run directory's files, read once for all figures (None / empty where a file is missing)."""

    path: Path
    label: str  # legend text, unique among the plotted runs
    history: History | None
    results: dict[str, Any] | None
    metrics: dict[str, list[dict[str, Any]]]


@dataclass(frozen=True, eq=False)
class SortedDifficulty:
    """Fig. 2 for one run: the last refresh's difficulties with classes in increasing order of accuracy."""

    label: str
    step: int  # the refresh's global iteration
    classes: np.ndarray  # (C,) class indices, by increasing A_C (ties: lower index first)
    acc: np.ndarray  # (C,) A_C of those classes
    difficulty: np.ndarray  # (C,) d of those classes


@dataclass(frozen=True, eq=False)
class Curve:
    """A y-over-x line of one run (Fig. 3: E over global iterations)."""

    label: str
    x: np.ndarray  # (K,)
    y: np.ndarray  # (K,)


@dataclass(frozen=True, eq=False)
class WeightPanel:
    """Fig. 4 for one run: normalised weights (mean 1 over classes) of one class per shot group over steps."""

    label: str
    steps: np.ndarray  # (K,) global iterations of the refreshes that carry weights
    groups: tuple[str, ...]  # (G,) shot group of each chosen class
    classes: tuple[int, ...]  # (G,) the chosen classes (see `representative_classes`)
    counts: tuple[int, ...]  # (G,) their training counts
    weights: np.ndarray  # (K, G) w_c / mean_k w_k


@dataclass(frozen=True, eq=False)
class ClassAccuracy:
    """Per-class test accuracy of one run against training count, with its shot-group means (fractions)."""

    label: str
    counts: np.ndarray  # (C,) training images per class
    acc: np.ndarray  # (C,) test accuracy, NaN for classes absent from the test set
    group_means: dict[str, float]  # many / medium / few mean accuracy (NaN for an empty group)


@dataclass(frozen=True, eq=False)
class TrainingCurves:
    """Loss and accuracy curves of one run from metrics.jsonl."""

    label: str
    loss_steps: np.ndarray  # (K,) global iterations of the logged train rows
    loss: np.ndarray  # (K,) training loss logged at those iterations
    epochs: np.ndarray  # (E,) epoch indices
    val_top1: np.ndarray  # (E,) balanced val top-1 after each epoch, fraction


@dataclass(frozen=True)
class PlotReport:
    """What `plot_runs` did: the PNGs it wrote, and one line per figure or run it had to leave out."""

    written: tuple[Path, ...]
    skipped: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Reads each run's history.jsonl, results.json and metrics.jsonl (each optional; a damaged one is an error).

    Raises:
        FileNotFoundError: a path is not a directory.
    """
    paths = list(dict.fromkeys(Path(r) for r in run_dirs))  # the same run named twice is plotted once
    for path in paths:
        if not path.is_dir():
            msg = f"{path}: not a run directory"
            raise FileNotFoundError(msg)
    results = functools.partial(load_results, finished=False)  # an unfinished run still has curves
    loaded = [(p, _optional(read_history, p), _optional(results, p), _optional(read_metrics, p) or {})
              for p in paths]
    labels = _unique_labels([_base_label(p, res) for p, _, res, _ in loaded], paths)
    return [Run(p, label, hist, res, met) for (p, hist, res, met), label in zip(loaded, labels, strict=True)]


def _optional(read: Callable[[Path], Any], path: Path) -> Any:
    try:
        return read(path)
    except FileNotFoundError:
        return None


def _base_label(path: Path, results: dict[str, Any] | None) -> str:
    """The method (and λ for Difficulty-Net) from results.json, else the folder name."""
    if results is None or "config" not in results:
        return path.name
    return run_label(results, with_lambda=True)


def _unique_labels(labels: list[str], paths: list[Path]) -> list[str]:
    """Adds the folder name (then the path) to labels that several runs share."""
    named = [f"{lab} [{p.name}]" if labels.count(lab) > 1 else lab for lab, p in zip(labels, paths, strict=True)]
    return [f"{lab} [{p}]" if named.count(n) > 1 else n for lab, n, p in zip(labels, named, paths, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Figure data


def difficulty_data(runs: Sequence[Run]) -> list[SortedDifficulty]:
    """Fig. 2: per run, d of the last refresh that has difficulties, classes sorted by that refresh's A_C."""
    out = []
    for run in runs:
        row = None if run.history is None else run.history.last_row_with("difficulty")
        if row is None:
            continue
        acc = run.history.acc[row]
        order = np.argsort(acc, kind="stable")  # stable: ties keep class order, so the figure is reproducible
        out.append(SortedDifficulty(run.label, int(run.history.step[row]), order, acc[order],
                                    run.history.difficulty[row][order]))
    return out


def entropy_data(runs: Sequence[Run]) -> list[Curve]:
    """Fig. 3: per run, E of the difficulties (see `dnet_fast.history.entropy`) at every refresh."""
    out = []
    for run in runs:
        if run.history is None:
            continue
        e = run.history.entropy
        keep = ~np.isnan(e)
        if keep.any():
            out.append(Curve(run.label, run.history.step[keep], e[keep]))
    return out


def representative_classes(train_counts: np.ndarray) -> dict[str, int]:
    """The median-count class of each non-empty shot group (lower median; ties by class index).

    Args:
        train_counts: (C,) training images per class.

    Returns:
        ``{"many": c, "medium": c, "few": c}`` in that order, empty groups left out.
    """
    counts = np.asarray(train_counts)
    groups = shot_groups(counts)
    chosen = {}
    for group in GROUPS:
        members = np.flatnonzero(groups == group)
        if members.size:
            by_count = members[np.lexsort((members, counts[members]))]
            chosen[group] = int(by_count[(members.size - 1) // 2])
    return chosen


def weights_data(runs: Sequence[Run]) -> list[WeightPanel]:
    """Fig. 4: per run with weights and class counts, w of one class per shot group at every refresh.

    Each row is divided by its mean over all classes, so Difficulty-Net's w and a loss's own weights (both
    normalised to sum C) and products of the two are on the same scale.
    """
    out = []
    for run in runs:
        if run.history is None or run.results is None or "class_counts" not in run.results:
            continue
        keep = ~np.isnan(run.history.weights).all(axis=1)
        if not keep.any():
            continue
        counts = np.asarray(run.results["class_counts"])
        chosen = representative_classes(counts)
        w = run.history.weights[keep]  # (K, C)
        normalised = w / np.nanmean(w, axis=1, keepdims=True)
        classes = tuple(chosen.values())
        out.append(WeightPanel(run.label, run.history.step[keep], tuple(chosen), classes,
                               tuple(int(counts[c]) for c in classes), normalised[:, list(classes)]))
    return out


def class_accuracy_data(runs: Sequence[Run]) -> list[ClassAccuracy]:
    """Per run with a test result: per-class test accuracy and training counts from results.json."""
    out = []
    for run in runs:
        results = run.results
        if results is None or "test" not in results or "class_counts" not in results:
            continue
        counts = np.asarray(results["class_counts"], dtype=np.int64)
        acc = np.array(results["test"]["per_class"], dtype=np.float64)  # null (absent class) -> NaN
        present = counts > 0  # every class has training images; guards hand-made files
        out.append(ClassAccuracy(run.label, counts, acc, group_accuracies(acc[present], counts[present])))
    return out


def curves_data(runs: Sequence[Run]) -> list[TrainingCurves]:
    """Per run with metrics: the logged train loss over iterations and the val top-1 over epochs."""
    out = []
    for run in runs:
        train = [r for r in run.metrics.get("train", []) if r.get("loss") is not None]
        epochs = [r for r in run.metrics.get("epoch", []) if r.get("val_top1") is not None]
        if train or epochs:
            out.append(TrainingCurves(
                run.label,
                np.array([r["step"] for r in train], dtype=np.int64),
                np.array([r["loss"] for r in train], dtype=np.float64),
                np.array([r["step"] for r in epochs], dtype=np.int64),
                np.array([r["val_top1"] for r in epochs], dtype=np.float64),
            ))
    return out


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _figure(ncols: int = 1, *, width: float = 6.0) -> tuple[Any, list[Any]]:
    """A new Agg-rendered figure with ``ncols`` side-by-side axes (no pyplot: nothing global to close)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        msg = "dnet-fast plot needs matplotlib (pip install 'dnet-fast[plot]')"
        raise ImportError(msg) from err
    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Any, path: Path) -> None:
    """PNG through a temporary file renamed over ``path`` (an error leaves the old file and no temporary)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)


def render_difficulty(data: Sequence[SortedDifficulty], path: Path) -> None:
    """Paper Fig. 2: difficulty against class rank by accuracy, one line per run."""
    fig, (ax,) = _figure()
    for item in data:
        ax.plot(np.arange(len(item.classes)), item.difficulty, marker=".", label=f"{item.label} (step {item.step})")
    ax.set(xlabel="classes sorted by increasing accuracy A_C", ylabel="difficulty d (Difficulty-Net output)",
           title="Predicted difficulty per class (last A_C refresh)")
    ax.legend()
    _save(fig, path)


def render_entropy(data: Sequence[Curve], path: Path) -> None:
    """Paper Fig. 3: E of the difficulties over training iterations, one line per run."""
    fig, (ax,) = _figure()
    for curve in data:
        ax.plot(curve.x, curve.y, label=curve.label)
    ax.set(xlabel="training step", ylabel="E = −(1/C) Σ log(C·d_c / Σ d)",
           title="Entropy of the predicted difficulties (0 = uniform weights)")
    ax.legend()
    _save(fig, path)


def render_weights(data: Sequence[WeightPanel], path: Path) -> None:
    """Paper Fig. 4: one panel per run, the normalised weight of one many-, medium- and few-shot class."""
    fig, axes = _figure(len(data), width=max(5.0, 7.0 / len(data)))
    for ax, panel in zip(axes, data, strict=True):
        for j, (group, cls, count) in enumerate(zip(panel.groups, panel.classes, panel.counts, strict=True)):
            ax.plot(panel.steps, panel.weights[:, j], label=f"{group}: class {cls} ({count} images)")
        ax.set(xlabel="training step", ylabel="normalised weight w_c / mean(w)", title=panel.label)
        ax.legend()
    title = "Class weights during training" + (": " if len(data) > 1 else "\n") + "the median-count class of each shot group"
    fig.suptitle(title)
    _save(fig, path)


def render_class_accuracy(data: Sequence[ClassAccuracy], path: Path) -> None:
    """Per-class test accuracy against training count (log x), many/medium/few bands with each run's group mean."""
    fig, (ax,) = _figure()
    counts = np.concatenate([item.counts for item in data])
    xmin, xmax = counts.min() * 0.8, counts.max() * 1.25
    # Integer counts: few <= FEW - 1, medium FEW..MANY, many >= MANY + 1, so the band edges sit half-way.
    edges = {"few": (xmin, FEW_THRESHOLD - 0.5), "medium": (FEW_THRESHOLD - 0.5, MANY_THRESHOLD + 0.5),
             "many": (MANY_THRESHOLD + 0.5, xmax)}
    bands = {g: (max(lo, xmin), min(hi, xmax)) for g, (lo, hi) in edges.items() if min(hi, xmax) > max(lo, xmin)}
    for group, (lo, hi) in bands.items():
        ax.axvspan(lo, hi, color="0.86" if group == "medium" else "0.93", zorder=0)
        ax.text(np.sqrt(lo * hi), 102, group, ha="center", va="bottom", fontsize=8)
    for item in data:
        points = ax.scatter(item.counts, 100 * item.acc, s=12, label=item.label)
        for group, (lo, hi) in bands.items():  # dashed: the group's mean accuracy
            ax.hlines(100 * item.group_means[group], lo, hi, colors=points.get_facecolor()[:1], linestyles="--")
    ax.set_xscale("log")
    ax.set(xlim=(xmin, xmax), ylim=(-2, 110), xlabel="training images of the class (log scale)",
           ylabel="test accuracy (%)", title="Per-class test accuracy (few < 20 ≤ medium ≤ 100 < many)")
    ax.legend()
    _save(fig, path)


def render_curves(data: Sequence[TrainingCurves], path: Path) -> None:
    """Train loss per logged iteration (left) and val top-1 per epoch (right)."""
    fig, (loss_ax, acc_ax) = _figure(2, width=5.0)
    for item in data:
        loss_ax.plot(item.loss_steps, item.loss, label=item.label)
        acc_ax.plot(item.epochs, 100 * item.val_top1, marker=".", label=item.label)
    loss_ax.set(xlabel="training step", ylabel="train loss", title="Training loss")
    acc_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="Balanced val accuracy")
    loss_ax.legend()
    acc_ax.legend()
    _save(fig, path)


@dataclass(frozen=True)
class _Figure:
    data: Callable[[Sequence[Run]], list[Any]]
    render: Callable[[Any, Path], None]
    needs: str  # what a run must have to appear in the figure


FIGURES: dict[str, _Figure] = {
    "fig2_difficulty": _Figure(difficulty_data, render_difficulty, "difficulties in history.jsonl"),
    "fig3_entropy": _Figure(entropy_data, render_entropy, "difficulties in history.jsonl"),
    "fig4_weights": _Figure(weights_data, render_weights, "weights in history.jsonl and results.json"),
    "per_class_accuracy": _Figure(class_accuracy_data, render_class_accuracy, "a test result in results.json"),
    "curves": _Figure(curves_data, render_curves, "metrics.jsonl"),
}


# ----------------------------------------------------------------------------------------------------------
# Files


def figure_paths(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Where `plot_runs` writes each figure of ``FIGURES`` for these runs.

    One run without ``out``: ``RUN/<figure>.png``. Otherwise ``OUT/<figure>-<tag>.png``, OUT defaulting to the
    runs' common parent and the tag naming the runs (sorted, relative to OUT; hashed when long), so plots of
    different sets of runs into one folder never overwrite each other.
    """
    runs = list(dict.fromkeys(Path(r) for r in run_dirs))
    if not runs:
        msg = "no runs to plot"
        raise ValueError(msg)
    if len(runs) == 1 and (out is None or Path(out).resolve() == runs[0].resolve()):
        return {name: runs[0] / f"{name}.png" for name in FIGURES}
    folder = Path(out) if out is not None else _common_parent(runs)
    tag = _tag(runs, folder)
    return {name: folder / f"{name}-{tag}.png" for name in FIGURES}


def _common_parent(runs: list[Path]) -> Path:
    """The deepest folder holding every run; relative to the working directory when all runs were given so."""
    common = os.path.commonpath([str(r.resolve()) for r in runs])  # normalised: "../a" and "b" compare right
    return Path(common) if any(r.is_absolute() for r in runs) else Path(os.path.relpath(common))


def _tag(runs: list[Path], folder: Path) -> str:
    names = sorted(os.path.relpath(r, folder) for r in runs)
    tag = "+".join(re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("._") or "run" for n in names)
    if len(tag) <= _TAG_CHARS:
        return tag
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    return f"{tag[: _TAG_CHARS - 9]}-{digest}"


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> PlotReport:
    """Writes every figure of ``FIGURES`` that at least one run has data for (see `figure_paths` for names).

    Args:
        run_dirs: run directories (history.jsonl, results.json, metrics.jsonl; each optional).
        out: folder for the PNGs; default: the run directory (one run) or the runs' common parent.

    Returns:
        The written paths and, for each figure, which runs it had to leave out and why.

    Raises:
        ValueError: no figure has data from any run.
    """
    runs = load_runs(run_dirs)
    paths = figure_paths([r.path for r in runs], out)
    written, skipped = [], []
    for name, figure in FIGURES.items():
        data = figure.data(runs)
        shown = {item.label for item in data}
        missing = [str(r.path) for r in runs if r.label not in shown]
        if missing:
            skipped.append(f"{name}: left out {', '.join(missing)} (needs {figure.needs})")
        if data:
            figure.render(data, paths[name])
            written.append(paths[name])
    if not written:
        msg = "nothing to plot: the runs have no history.jsonl, results.json or metrics.jsonl with data"
        raise ValueError(msg)
    return PlotReport(tuple(written), tuple(skipped))
