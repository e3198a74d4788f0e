"""Run directories: naming a new one, refusing to train into an existing run, and reading one back (results.json,
metrics.jsonl, JSON-lines files with a torn last line, labels)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "RESULTS_FILE",
    "RUN_FILES",
    "check_fresh",
    "load_results",
    "new_run_dir",
    "read_jsonl",
    "read_metrics",
    "run_label",
    "run_seed",
    "stage2_method",
]

RESULTS_FILE = "results.json"  # written by engine.fit at the end of a run (also when stopped early)
METRICS_FILE = "metrics.jsonl"  # runlog.RunLog.log rows {"kind": "train" | "epoch", "step", ...}
#: Files whose presence means a directory holds a run (training into it again needs --resume).
RUN_FILES = ("config.yaml", METRICS_FILE, "last.pt", RESULTS_FILE, "history.jsonl")


def new_run_dir(name: str, mode: str, seed: int, root: str | Path = "runs") -> Path:
    """A run directory that does not exist yet: ``root/<name>/<UTC time>-<mode>-s<seed>`` (``-2``, ... if taken)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / (name or "train") / f"{stamp}-{mode}-s{seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_fresh(run_dir: str | Path) -> None:
    """Refuses a directory that already holds a run, so a new run never appends to another's files.

    Raises:
        ValueError: the directory holds one of `RUN_FILES` (the message says to resume or pick another).
    """
    found = [f for f in RUN_FILES if (Path(run_dir) / f).exists()]
    if found:
        msg = (f"{run_dir} already holds a run ({', '.join(found)}): pass --resume to continue it, or choose "
               "another run.out_dir (leave it unset for a new directory per run)")
        raise ValueError(msg)


def read_jsonl(path: str | Path, *, skip_damaged: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per line, in file order.

    An append-only writer killed mid-write can only tear the last line, so an unparsable last line is dropped;
    an unparsable line anywhere else raises ``ValueError`` naming the line, unless ``skip_damaged``.

    Args:
        path: the file.
        skip_damaged: skip every unparsable line. For files that a resumed writer appends to without repairing
            them first (metrics.jsonl: the torn row of the killed run and the first row of the resumed one then
            share a line).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) or skip_damaged:
                continue  # torn by a killed writer
            msg = f"{path}:{number}: not a JSON line ({err.msg})"
            raise ValueError(msg) from err
        if not isinstance(row, dict):
            msg = f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
            raise ValueError(msg)
        rows.append(row)
    return rows


def load_results(run: str | Path, *, finished: bool = True) -> dict[str, Any]:
    """``run/results.json``; with ``finished``, also requires the test result of a completed run.

    Raises:
        FileNotFoundError: the run has no results.json yet.
        ValueError: ``finished`` and the run stopped before its test evaluation.
    """
    path = Path(run) / RESULTS_FILE
    if not path.is_file():
        msg = f"{path}: no results.json (has the run finished?)"
        raise FileNotFoundError(msg)
    results = json.loads(path.read_text(encoding="utf-8"))
    if finished and "test" not in results:
        msg = f"{path}: the run stopped before the end; no test result"
        raise ValueError(msg)
    return results


def read_metrics(run: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``run/metrics.jsonl`` split by kind, each sorted by step, the last row per (kind, step) kept.

    A resumed run appends again the rows a killed run had logged after its last checkpoint; the later row is
    the one the resumed (and surviving) training produced.

    Returns:
        ``{"train": [...], "epoch": [...], ...}``: ``train`` rows are keyed by global iteration, ``epoch`` rows
        by epoch index (as `runlog.RunLog.log` writes them).
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in read_jsonl(Path(run) / METRICS_FILE, skip_damaged=True):
        latest[(str(row.get("kind")), int(row["step"]))] = row
    out: dict[str, list[dict[str, Any]]] = {}
    for (kind, _), row in sorted(latest.items()):
        out.setdefault(kind, []).append(row)
    return out


#: Method names of the meta modes in labels (a mode missing here is labelled by its registry name).
_METHODS = {
    "exact": "Difficulty-Net (exact)",
    "driver": "Difficulty-Net (driver)",
    "frozen": "Difficulty-Net (frozen)",
    "exact_absolute": "Difficulty-Net (exact, absolute)",
    "exact_sample": "Difficulty-Net (exact, sample-level)",
    "mwn": "MWN",
    "off": "",
}
#: Loss names in labels, as the paper's tables write them.
_LOSSES = {
    "ce": "CE", "focal": "Focal", "cb": "CB", "ldam": "LDAM", "eql": "EQL", "cdb_ce": "CDB-CE",
    "logit_adjust": "Logit adjustment", "balanced_softmax": "Balanced Softmax",
}
_WITH_LAMBDA = ("exact", "driver", "exact_absolute", "exact_sample")  # the modes with a driver loss
_DIFFNET_MODES = (*_WITH_LAMBDA, "frozen")  # the modes weighting by a Difficulty-Net (diffnet.temperature)


def run_label(results: dict[str, Any], *, with_lambda: bool = False) -> str:
    """A method name from a run's config, e.g. ``Difficulty-Net (exact) + CE`` or ``Balanced Softmax``; a stage-2
    run names both stages, ``Difficulty-Net (exact) + CE → LAS``.

    Args:
        results: the run's results.json.
        with_lambda: append the driver-loss weight of Difficulty-Net runs (``…, λ = 0.3``), for figures and
            comparisons of λ values. A ``diffnet.temperature`` other than 1 is always appended (``…, T = 0.2``).
    """
    cfg = results["config"]
    mode, loss = cfg["meta"]["mode"], cfg["loss"]["name"]
    method = _METHODS.get(mode, mode)
    loss_name = _LOSSES.get(loss, loss)
    label = f"{method} + {loss_name}" if method else loss_name
    temperature = (cfg.get("diffnet") or {}).get("temperature", 1.0)
    if mode in _DIFFNET_MODES and temperature != 1.0:  # the opt-in variant is another method: always named
        label += f", T = {temperature:g}"
    if with_lambda and mode in _WITH_LAMBDA and "lambda_dr" in cfg["meta"]:
        label += f", λ = {cfg['meta']['lambda_dr']:g}"
    stage2 = stage2_method(results)
    if stage2 is not None:
        label += f" → {results.get('stage2', {}).get('label') or stage2}"
    return label


def stage2_method(results: dict[str, Any]) -> str | None:
    """The stage-2 method of a run (``config.stage2.method``), None for a stage-1 run (or one from before stage 2)."""
    method = (results["config"].get("stage2") or {}).get("method", "none")
    return None if method == "none" else str(method)


def run_seed(results: dict[str, Any], run: str | Path) -> int:
    """The run's seed (``config.run.seed``); ``ValueError`` naming the run when it is missing."""
    try:
        return int(results["config"]["run"]["seed"])
    except (KeyError, TypeError) as err:
        msg = f"{Path(run) / RESULTS_FILE}: no config.run.seed"
        raise ValueError(msg) from err
