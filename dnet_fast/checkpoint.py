"""Checkpoint files: saved atomically (``dnet_fast.atomic``), loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dnet_fast.atomic import atomic_open

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not a dnet-fast checkpoint."""


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
