"""Hand-made run directories (results.json, history.jsonl, metrics.jsonl) for the report, plot and compare tests."""

from __future__ import annotations

import json
from pathlib import Path

from dnet_fast.history import HistoryRow, HistoryWriter

__all__ = ["COUNTS", "write_history", "write_metrics", "write_results"]

# Six classes: many = 0, 1, 2 (400, 200, 120), medium = 3, 4 (60, 30), few = 5 (10).
COUNTS = (400, 200, 120, 60, 30, 10)


def write_results(run: Path, *, seed: int = 0, mode: str = "exact", loss: str = "ce", lambda_dr: float = 0.3,
                  test: dict | None = None, counts: tuple[int, ...] = COUNTS) -> Path:
    """results.json of a finished run (no ``test`` entry when ``test`` is None)."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"meta": {"mode": mode, "lambda_dr": lambda_dr}, "loss": {"name": loss}, "run": {"seed": seed}}
    results = {"config": cfg, "epochs_done": 2, "class_counts": list(counts)}
    if test is not None:
        results["test"] = test
    (run / "results.json").write_text(json.dumps(results))
    return run


def write_history(run: Path, rows: list[HistoryRow], num_classes: int = len(COUNTS)) -> Path:
    """history.jsonl through the real writer (a fresh run)."""
    run.mkdir(parents=True, exist_ok=True)
    with HistoryWriter(run, num_classes, resume_step=None) as writer:
        for row in rows:
            writer.append(row)
    return run


def write_metrics(run: Path, rows: list[dict]) -> Path:
    """metrics.jsonl with the given rows, one JSON object per line."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run
