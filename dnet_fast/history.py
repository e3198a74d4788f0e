"""The per-class training history file ``history.jsonl``: what Difficulty-Net saw and predicted at each A_C refresh.

Format. One JSON object per line, one line per A_C refresh (the start of training, every epoch end, and every
mid-epoch refresh of ``meta.acc_every``), appended in step order and fsynced, so a crash can only tear the last
line; readers drop a torn last line and a resumed run rewrites the file without it. C is the number of classes.

=============  ==========  =================================================================================
field          shape       meaning (unit)
=============  ==========  =================================================================================
``step``       int         global iteration (optimizer steps done) from which this refresh is used: the first
                           iteration trained with the new A_C. Strictly increasing within the file.
``epoch``      int         the epoch that iteration starts (a row written after the last epoch has
                           ``epoch`` = epochs done, and is only used if the run is extended)
``acc``        (C,)        A_C fed to Difficulty-Net / the loss: per-class val accuracy, fraction in [0, 1]
                           (zeros at step 0 with ``diffnet.init_acc = zeros``)
``difficulty`` (C,) | null d = D(A_C; θ): Difficulty-Net's sigmoid outputs in (0, 1) before normalisation, with θ
                           as of ``step``; null without a class-level net (off, mwn, exact_sample)
``weights``    (C,) | null the per-class factor multiplying each sample's loss from ``step`` on: Difficulty-Net's
                           w = C·d/Σd times the loss's own class weights (CDB-CE, class-balanced, LDAM-DRW),
                           either one alone where the other does not exist, all ones only when training is
                           really unweighted; null when weights are per sample (mwn, exact_sample with an
                           unweighted loss)
``train_acc``  (C,) | null per-class top-1 on the (augmented, train-mode) training batches since the previous
                           refresh, fraction; null in the first row
``val_acc``    (C,) | null per-class val accuracy measured at this refresh (equals ``acc`` when A_C is that
                           measurement); null when nothing was measured (step 0 with ``init_acc = zeros``)
=============  ==========  =================================================================================

Values: floats rounded to 6 significant digits (``f"{x:.6g}"``, ample for accuracies in multiples of 1/25 and
weights near 1); NaN or ±inf elements are written as null (e.g. a class without any training sample since the
last refresh); the reader turns null, for a whole array or an element, into NaN. In the driver and exact modes θ
changes every iteration, so ``difficulty`` and ``weights`` are snapshots at ``step``, not averages over the
interval. Reading keeps the last row of each step, so a file repaired by hand still reads unambiguously.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.atomic import atomic_open
from dnet_fast.rundir import read_jsonl

__all__ = ["HISTORY_FILE", "History", "HistoryRow", "HistoryWriter", "entropy", "read_history"]

HISTORY_FILE = "history.jsonl"
_ARRAYS = ("acc", "difficulty", "weights", "train_acc", "val_acc")
_OPTIONAL = _ARRAYS[1:]  # every array but A_C may be null


@dataclass(frozen=True)
class HistoryRow:
    """One A_C refresh, as passed to `HistoryWriter.append` (arrays: (C,) host arrays or CPU tensors)."""

    step: int  # global iteration from which the refresh is used
    epoch: int  # epoch that iteration starts
    acc: Any  # (C,) A_C fed to the net, fractions
    difficulty: Any = None  # (C,) d = D(A_C; θ), or None without Difficulty-Net
    weights: Any = None  # (C,) class weights in use (see the module docstring), or None
    train_acc: Any = None  # (C,) train accuracy since the previous refresh, or None
    val_acc: Any = None  # (C,) val accuracy measured now, or None


def entropy(difficulty: np.ndarray) -> np.ndarray:
    """E = −(1/C) Σ_c log(C·d_c / Σ_k d_k) over the last axis (paper Fig. 3; 0 for uniform d, larger when spread).

    Args:
        difficulty: (..., C) difficulties (or any positive weights: E is scale-invariant).

    Returns:
        (...) entropies; NaN where any d_c is NaN.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # d_c = 0 gives E = inf, as the formula says
        return -np.log(d.shape[-1] * d / d.sum(axis=-1, keepdims=True)).mean(axis=-1)


@dataclass(frozen=True, eq=False)
class History:
    """A run's history file, read back: one row per refresh, sorted by step.

    Attributes:
        step: (R,) int64 global iteration of each refresh.
        epoch: (R,) int64 epoch of each refresh.
        acc, difficulty, weights, train_acc, val_acc: (R, C) float64, NaN where the file has null.
    """

    step: np.ndarray
    epoch: np.ndarray
    acc: np.ndarray
    difficulty: np.ndarray
    weights: np.ndarray
    train_acc: np.ndarray
    val_acc: np.ndarray

    def __len__(self) -> int:
        return len(self.step)

    @property
    def num_classes(self) -> int:
        """C."""
        return self.acc.shape[1]

    @property
    def entropy(self) -> np.ndarray:
        """(R,) E of the difficulties of each row (NaN for rows without Difficulty-Net)."""
        return entropy(self.difficulty)

    def last_row_with(self, field: str) -> int | None:
        """Index of the last row where ``field`` holds any value (not all NaN), or None."""
        present = np.flatnonzero(~np.isnan(getattr(self, field)).all(axis=1))
        return int(present[-1]) if present.size else None


class HistoryWriter:
    """Appends rows to ``run_dir/history.jsonl``; one instance per run (rank 0 only).

    Args:
        run_dir: the run directory (created if needed).
        num_classes: C, the length of every array.
        resume_step: None for a fresh run (an existing history is replaced by an empty one); the checkpoint's
            global step when resuming: the rows up to and including that step are kept and the rest, written by
            the killed run after its last checkpoint, are dropped. The rewrite is atomic.
    """

    def __init__(self, run_dir: str | Path, num_classes: int, *, resume_step: int | None) -> None:
        if num_classes < 1:
            msg = f"num_classes must be >= 1, got {num_classes}"
            raise ValueError(msg)
        self.path = Path(run_dir) / HISTORY_FILE
        self.num_classes = num_classes
        kept = [] if resume_step is None else self._rows_up_to(resume_step)
        with atomic_open(self.path, "w") as f:
            f.writelines(_encode(row) for row in kept)
        self.last_step: int | None = kept[-1]["step"] if kept else None
        self._file = self.path.open("a", encoding="utf-8")

    def _rows_up_to(self, resume_step: int) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []  # a checkpoint from before history files existed: start the history here
        rows = [r for r in _latest_per_step(read_jsonl(self.path)) if r["step"] <= resume_step]
        for row in rows:
            _check_lengths(row, self.num_classes, f"{self.path} (step {row['step']})")
        return rows

    def append(self, row: HistoryRow) -> None:
        """Validates ``row`` (ints, (C,) arrays, step after the last one), appends it, flushes and fsyncs.

        The fsync makes the row durable before the engine writes the checkpoint of the same step, so a resumed
        run never lacks a row its checkpoint covers.
        """
        record = _record(row, self.num_classes)
        if self.last_step is not None and record["step"] <= self.last_step:
            msg = f"history step {record['step']} is not after the last written step {self.last_step}"
            raise ValueError(msg)
        self._file.write(_encode(record))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_step = record["step"]

    def close(self) -> None:
        """Closes the file."""
        self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(row: HistoryRow, num_classes: int) -> dict[str, Any]:
    """The JSON object of ``row``: checked ints, compact (C,) float lists, None for absent arrays."""
    record: dict[str, Any] = {}
    for key in ("step", "epoch"):
        value = getattr(row, key)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            msg = f"history {key} must be an int >= 0, got {value!r}"
            raise ValueError(msg)
        record[key] = int(value)
    if row.acc is None:
        msg = "history acc (the A_C fed to the net) is required"
        raise ValueError(msg)
    for key in _ARRAYS:
        record[key] = None if getattr(row, key) is None else _compact(getattr(row, key), key, num_classes)
    return record


def _compact(values: Any, key: str, num_classes: int) -> list[float | None]:
    """(C,) values as floats of 6 significant digits, non-finite ones as None."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (num_classes,):
        msg = f"history {key} must have shape ({num_classes},), got {array.shape}"
        raise ValueError(msg)
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in array.tolist()]


def _encode(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"


def _latest_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by step, the last one of each step kept."""
    latest: dict[int, dict[str, Any]] = {}
    for row in rows:
        if not isinstance(row.get("step"), int) or not isinstance(row.get("epoch"), int):
            msg = f"history row without integer step/epoch: {str(row)[:80]}"
            raise ValueError(msg)
        latest[row["step"]] = row
    return [latest[s] for s in sorted(latest)]


def _check_lengths(row: dict[str, Any], num_classes: int, where: str) -> None:
    for key in _ARRAYS:
        value = row.get(key)
        if value is None and key in _OPTIONAL:
            continue
        if not isinstance(value, list) or len(value) != num_classes:
            msg = f"{where}: {key} must be a list of {num_classes} numbers"
            raise ValueError(msg)


def read_history(run_dir: str | Path) -> History:
    """Reads ``run_dir/history.jsonl`` (torn last line ignored, last row per step kept, sorted by step).

    Raises:
        FileNotFoundError: the run has no history file.
        ValueError: the file is empty or damaged (a bad line before the last, arrays of different lengths).
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        msg = f"{path}: no history file"
        raise FileNotFoundError(msg)
    rows = _latest_per_step(read_jsonl(path))
    if not rows:
        msg = f"{path}: no rows yet"
        raise ValueError(msg)
    num_classes = len(rows[0].get("acc") or [])
    if num_classes == 0:
        msg = f"{path}: the first row has no acc array"
        raise ValueError(msg)
    for row in rows:
        _check_lengths(row, num_classes, f"{path} (step {row['step']})")
    arrays = {key: _stack([row.get(key) for row in rows], num_classes) for key in _ARRAYS}
    return History(
        step=np.array([row["step"] for row in rows], dtype=np.int64),
        epoch=np.array([row["epoch"] for row in rows], dtype=np.int64),
        **arrays,
    )


def _stack(values: list[list[float | None] | None], num_classes: int) -> np.ndarray:
    """(R, C) float64 from R lists (or None) with None elements, NaN for every None."""
    nan_row = [None] * num_classes
    return np.array([nan_row if v is None else v for v in values], dtype=np.float64)
