"""Result tables: one run's summary, a checkpoint evaluation, and mean ± std over seeds across run folders."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.history import read_history
from dnet_fast.plots import figure_paths
from dnet_fast.rundir import load_results, run_label, stage2_method

__all__ = ["format_eval", "format_report", "format_results", "runs_table"]

_METRICS = ("top1", "many", "medium", "few")
_COMPARE_HINT = ("paired differences between two methods (by seed, with 95 % Student-t intervals): "
                 "dnet-fast compare A_RUN... --vs B_RUN...")


def _pct(value: float | None) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:5.2f}"


def format_results(results: dict[str, Any], out_dir: str) -> str:
    """The table printed at the end of ``dnet-fast train``."""
    test = results.get("test")
    if test is None:
        return f"stopped after {results['epochs_done']} epochs; checkpoint in {out_dir}/last.pt"
    head = "| split | top-1 | many | medium | few |\n|---|---|---|---|---|"
    row = "| test | " + " | ".join(_pct(test[k]) for k in _METRICS) + " |"
    stage1 = results.get("stage1", {}).get("test")
    if stage1 is not None:  # a stage-2 run: the stage-1 model it started from, for comparison
        row += "\n| test, stage 1 | " + " | ".join(_pct(stage1[k]) for k in _METRICS) + " |"
    return f"{head}\n{row}\nmodel: {results['selected']}; run directory: {out_dir}"


def format_eval(result: dict[str, Any]) -> str:
    """The table printed by ``dnet-fast eval``."""
    head = "| split | top-1 | many | medium | few |\n|---|---|---|---|---|"
    row = f"| {result['split']} | " + " | ".join(_pct(result[k]) for k in _METRICS) + " |"
    return f"{head}\n{row}\ncheckpoint: {result['checkpoint']} (epochs done: {result['epoch']})"


def _seedless(path: Path) -> str:
    """The run folder without its trailing seed (``runs/demo/exact-seed2`` -> ``runs/demo/exact``)."""
    return str(path.parent / re.sub(r"[-_]?(seed|s)\d+$", "", path.name))


def _group_name(run: str | Path, results: dict[str, Any]) -> str:
    """What the seeds of one method share: the seedless folder; for a stage-2 run, its stage-1 run's seedless
    folder and the method (``runs/demo/exact-seed2/las`` -> ``runs/demo/exact/las``)."""
    method = stage2_method(results)
    if method is None:
        return _seedless(Path(run))
    return str(Path(_seedless(Path(results["config"]["stage2"]["source"]))) / method)


def _mean_std(values: Sequence[float], fmt: str) -> str:
    """``mean ± std`` (ddof = 1) of the non-NaN values, ``mean`` for one, ``n/a`` for none."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]  # an empty shot group has no accuracy (NaN / null); runs without history
    if not len(values):
        return "n/a"
    with np.errstate(invalid="ignore"):  # an infinite weight ratio has an undefined std: shown as nan
        std = f" ± {np.std(values, ddof=1):{fmt}}" if len(values) > 1 else ""
    return f"{np.mean(values):{fmt}}{std}"


def _final_spread(run: str | Path) -> tuple[float, float]:
    """(w_max / w_min, E) at the run's last A_C refresh from history.jsonl; NaN where the run has none."""
    try:
        history = read_history(run)
    except (FileNotFoundError, ValueError):
        return math.nan, math.nan  # a run from before history files, or one without a readable history
    w_row, d_row = history.last_row_with("weights"), history.last_row_with("difficulty")
    ratio = math.nan
    if w_row is not None:
        w = history.weights[w_row]
        with np.errstate(divide="ignore"):  # CDB-CE gives weight 0 to a class at accuracy 1: ratio inf
            ratio = float(np.divide(np.nanmax(w), np.nanmin(w)))
    return ratio, math.nan if d_row is None else float(history.entropy[d_row])


def runs_table(run_dirs: Sequence[str]) -> str:
    """Markdown table of finished runs, grouped by method, with mean ± std over the runs in each group.

    Besides the test accuracies (%), each group shows the final class-weight spread w_max/w_min and the entropy
    E of the difficulties at the last A_C refresh (from history.jsonl; n/a for runs without one): values near
    1 and 0 mean the learned weighting has become near-uniform (SPEC §4.4).
    """
    groups: dict[tuple[str, str], list[tuple[dict[str, float], tuple[float, float]]]] = defaultdict(list)
    for run in run_dirs:
        results = load_results(run)
        groups[(run_label(results), _group_name(run, results))].append((results["test"], _final_spread(run)))
    labels = [label for label, _ in groups]
    lines = ["| method | runs | top-1 | many | medium | few | w_max/w_min | E |", "|---|---|---|---|---|---|---|---|"]
    for (label, name), runs in groups.items():
        # The folder name tells apart groups that train the same method (e.g. two λ values).
        label = f"{label} [{name}]" if labels.count(label) > 1 else label
        cells = [_mean_std([np.nan if t[key] is None else 100 * t[key] for t, _ in runs], ".2f")
                 for key in _METRICS]
        cells += [_mean_std([spread[0] for _, spread in runs], ".4g"),
                  _mean_std([spread[1] for _, spread in runs], ".3g")]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figures(run_dirs: Sequence[str]) -> list[Path]:
    """PNGs of ``dnet-fast plot`` (default locations) for each run alone and for all of them together."""
    sets = [[run] for run in run_dirs] + ([list(run_dirs)] if len(run_dirs) > 1 else [])
    found = (path for runs in sets for path in figure_paths(runs).values())
    return [path for path in dict.fromkeys(found) if path.is_file()]


def format_report(run_dirs: Sequence[str]) -> str:
    """What ``dnet-fast report`` prints: `runs_table`, the figures already plotted and the compare command."""
    lines = [runs_table(run_dirs), "",
             "w_max/w_min, E: class-weight spread and difficulty entropy at the last A_C refresh "
             "(1 and 0 = uniform weights)"]
    figures = _figures(run_dirs)
    if figures:
        lines += ["figures (dnet-fast plot):", *(f"  {path}" for path in figures)]
    return "\n".join([*lines, _COMPARE_HINT])
