"""Checkpoint files (saved atomically through ``dnet_fast.atomic``, loaded with ``weights_only=True``) and the layout
of a training run's checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dnet_fast.atomic import atomic_open

__all__ = [
    "FORMAT",
    "PROGRESS_KEYS",
    "CheckpointError",
    "check_resumable",
    "load_checkpoint",
    "rng_state",
    "run_state",
    "save_checkpoint",
    "set_rng_state",
]


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
    if not isinstance(state["config"], dict):
        msg = f"{path}: its 'config' entry is a {type(state['config']).__name__}, not a mapping of config sections"
        raise CheckpointError(msg)
    return state


# ----------------------------------------------------------------------------------------------------------
# A training run's checkpoint: config, RNG, progress and what the meta mode owns

FORMAT = "dnet-fast/2"
#: Progress entries of a run checkpoint (``next_acc``: A_C the next epoch starts with).
PROGRESS_KEYS = ("epoch", "global_step", "next_acc", "best_val", "best_epoch")


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU, and every CUDA device when available)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_state(config: dict[str, Any], owned_state: dict[str, Any], progress: dict[str, Any]) -> dict[str, Any]:
    """A run checkpoint: ``config`` (as ``config_to_dict``), the RNG, ``progress`` (`PROGRESS_KEYS`) and the meta
    mode's ``state_dict()`` — everything ``MetaMode.owned`` declares, each under its declared name."""
    return {"format": FORMAT, "config": config, "rng": rng_state(), **progress, **owned_state}


def check_resumable(config: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    """A resumed run must use the checkpoint's config (only ``run.*`` and ``optim.epochs`` may differ).

    Raises:
        ValueError: a key differs (the message names it and both values).
    """
    for section, values in saved.items():
        for key, value in values.items():
            if section == "run" or (section, key) == ("optim", "epochs"):
                continue
            mine = config.get(section, {}).get(key)
            if mine != value:
                msg = f"cannot resume from {path}: {section}.{key} is {mine!r} but the checkpoint was trained with {value!r}"
                raise ValueError(msg)
