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

__all__ = ["RunLog", "progress"]

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
        enabled: False on the other ranks of a torchrun run: nothing is created and every method returns.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.dir = Path(out_dir)
        self.enabled = enabled
        self._jsonl: Any = None
        self._tb: Any = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.dir / "metrics.jsonl").open("a")
        self._tb = _open_tensorboard(self.dir / "tb") if tensorboard else None

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


def _open_tensorboard(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # tensorboard's protobuf modules emit deprecation warnings at import on recent Pythons.
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(path))


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
