"""Atomic checkpoint files: write to a temporary name, fsync, rename; load with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["CheckpointError", "atomic_open", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not a dnet-fast checkpoint."""


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path``; on success it is fsynced and renamed over ``path``.

    Readers therefore see either the old file or the complete new one, never a partial write; on error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialises ``state`` (tensors, dicts, lists, numbers, strings only) atomically to ``path``."""
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, unreadable or lacks the dnet-fast keys.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint not found: {path}"
        raise CheckpointError(msg)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        msg = f"cannot read checkpoint {path}: {err}"
        raise CheckpointError(msg) from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        msg = f"{path} is not a dnet-fast checkpoint (no 'model'/'config' entries)"
        raise CheckpointError(msg)
    return state
