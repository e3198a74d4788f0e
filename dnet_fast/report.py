"""Result tables: one run's summary, a checkpoint evaluation, and mean ± std over seeds across run folders."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.rundir import load_results, run_label

__all__ = ["format_eval", "format_results", "runs_table"]

_METRICS = ("top1", "many", "medium", "few")


def _pct(value: float | None) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:5.2f}"


def format_results(results: dict[str, Any], out_dir: str) -> str:
    """The table printed at the end of ``dnet-fast train``."""
    test = results.get("test")
    if test is None:
        return f"stopped after {results['epochs_done']} epochs; checkpoint in {out_dir}/last.pt"
    head = "| split | top-1 | many | medium | few |\n|---|---|---|---|---|"
    row = "| test | " + " | ".join(_pct(test[k]) for k in _METRICS) + " |"
    return f"{head}\n{row}\nmodel: {results['selected']}; run directory: {out_dir}"


def format_eval(result: dict[str, Any]) -> str:
    """The table printed by ``dnet-fast eval``."""
    head = "| split | top-1 | many | medium | few |\n|---|---|---|---|---|"
    row = f"| {result['split']} | " + " | ".join(_pct(result[k]) for k in _METRICS) + " |"
    return f"{head}\n{row}\ncheckpoint: {result['checkpoint']} (epochs done: {result['epoch']})"


def _seedless(path: Path) -> str:
    """The run folder without its trailing seed (``runs/demo/exact-seed2`` -> ``runs/demo/exact``)."""
    return str(path.parent / re.sub(r"[-_]?(seed|s)\d+$", "", path.name))


def runs_table(run_dirs: list[str]) -> str:
    """Markdown table of finished runs, grouped by method, with mean ± std over the runs in each group."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in run_dirs:
        results = load_results(run)
        groups[(run_label(results), _seedless(Path(run)))].append(results["test"])
    labels = [label for label, _ in groups]
    lines = ["| method | runs | top-1 | many | medium | few |", "|---|---|---|---|---|---|"]
    for (label, name), tests in groups.items():
        # The folder name tells apart groups that train the same method (e.g. two λ values).
        label = f"{label} [{name}]" if labels.count(label) > 1 else label
        cells = []
        for key in _METRICS:
            values = np.array([np.nan if t[key] is None else t[key] for t in tests], dtype=float) * 100
            values = values[~np.isnan(values)]  # an empty shot group has no accuracy (NaN / null)
            std = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.2f}{std}" if len(values) else "n/a")
        lines.append(f"| {label} | {len(tests)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
