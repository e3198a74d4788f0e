"""Run-directory logging: config.yaml, env.json, metrics.jsonl, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from dnet_fast.atomic import atomic_open, atomic_write_json
from dnet_fast.config import TrainConfig, dump_yaml
from dnet_fast.info import environment

__all__ = ["RunLog", "epoch_line", "format_seconds", "progress"]

T = TypeVar("T")


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors and numpy numbers become floats, NaN becomes null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Writes the run directory's files; one instance per run, writing on rank 0 only.

    Args:
        out_dir: the run directory, created if needed.
        tensorboard: also write TensorBoard event files under ``out_dir/tb``.
        resume: ``(global_step, epochs_done)`` of the checkpoint a resumed run continues from: metrics.jsonl is
            first rewritten (atomically) without the rows a killed run logged after that checkpoint, so no step
            appears twice, and TensorBoard purges its events past the step. None: a fresh run.
        enabled: False on the other ranks of a torchrun run: nothing is created and every method returns.
    """

    def __init__(
        self, out_dir: str | Path, *, tensorboard: bool = True, resume: tuple[int, int] | None = None,
        enabled: bool = True,
    ) -> None:
        self.dir = Path(out_dir)
        self.enabled = enabled
        self._jsonl: Any = None
        self._tb: Any = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume is not None and path.is_file():
            _truncate_metrics(path, *resume)
        self._jsonl = path.open("a")
        purge = None if resume is None else resume[0] + 1
        self._tb = _open_tensorboard(self.dir / "tb", purge) if tensorboard else None

    def write_config(self, cfg: TrainConfig) -> None:
        """Saves the resolved config as ``config.yaml`` and the environment as ``env.json``."""
        if not self.enabled:
            return
        with atomic_open(self.dir / "config.yaml", "w") as f:
            f.write(dump_yaml(cfg))
        self.write_json("env.json", environment())

    def write_json(self, name: str, payload: Mapping[str, Any]) -> None:
        """Writes ``payload`` to ``out_dir/name`` atomically."""
        if not self.enabled:
            return
        atomic_write_json(self.dir / name, payload, indent=2, default=_plain)

    def log(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one ``{"kind", "step", ...}`` line to metrics.jsonl and the scalars to TensorBoard."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("kind", "step") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Flushes and closes the files."""
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _kept(row: dict[str, Any], global_step: int, epochs_done: int) -> bool:
    """Whether a metrics row precedes the checkpoint: train rows by global step, epoch rows by epoch index."""
    if row.get("kind") == "epoch":
        return int(row["step"]) < epochs_done
    return int(row["step"]) <= global_step


def _truncate_metrics(path: Path, global_step: int, epochs_done: int) -> None:
    """Rewrites metrics.jsonl without rows logged after the checkpoint (and without a torn last line)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed writer
        if isinstance(row, dict) and _kept(row, global_step, epochs_done):
            kept.append(line)
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def _open_tensorboard(path: Path, purge_step: int | None = None) -> Any:
    try:
        with warnings.catch_warnings():
            # tensorboard's protobuf modules emit deprecation warnings at import on recent Pythons.
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


def progress(items: Iterable[T], *, total: int, desc: str, images_per_item: int, enabled: bool) -> Iterator[T]:
    """Yields ``items`` while showing a progress bar with images/s (on stderr, only when enabled)."""
    bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for done, item in enumerate(items, start=1):
            yield item
            rate = done * images_per_item / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} img/s", refresh=False)
            bar.update(1)
    finally:
        bar.close()


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``5m10s`` or ``42s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _pct(value: Any) -> str:
    value = _plain(value)
    return "n/a" if value is None else f"{100 * value:.1f}%"


def epoch_line(epoch: int, epochs: int, row: Mapping[str, Any], *, eta_s: float) -> str:
    """The one summary line printed after every epoch (to stdout, terminal or not: Slurm, nohup and CI logs).

    Args:
        epoch: the finished epoch (0-based).
        epochs: the run's epochs.
        row: the epoch's metrics.jsonl row (``last_loss``, ``train_top1``, ``val_*``, ``images_per_s``, ...).
        eta_s: estimated seconds until the last epoch of this call ends.
    """
    loss = _plain(row.get("last_loss"))
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"loss {loss:.4f}" if loss is not None else "loss n/a",
        f"train top-1 {_pct(row.get('train_top1'))}",
        f"val top-1 {_pct(row.get('val_top1'))} (many {_pct(row.get('val_many'))}, medium "
        f"{_pct(row.get('val_medium'))}, few {_pct(row.get('val_few'))})",
        f"{_plain(row.get('images_per_s')) or 0:,.0f} img/s",
        f"{format_seconds(_plain(row.get('epoch_seconds')) or 0)}",
        f"ETA {format_seconds(eta_s)}",
    ]
    if row.get("w_max") is not None:
        parts.insert(4, f"w [{row['w_min']:.3f}, {row['w_max']:.3f}]")
    return " | ".join(parts)
