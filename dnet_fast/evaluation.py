"""Evaluation: per-class accuracy of a model over batches, shot-group results, and checkpoint evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnet_fast.checkpoint import CheckpointError, load_checkpoint
from dnet_fast.config import TrainConfig, config_from_dict, resolve_paths
from dnet_fast.data import DATASETS, DataBundle, eval_batches, group_accuracies
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.metrics import class_counter
from dnet_fast.models import build_model
from dnet_fast.plugins import check_names
from dnet_fast.runlog import progress
from dnet_fast.stage2.methods import stage2_model

__all__ = [
    "EvalResult",
    "class_accuracy",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_from_accuracy",
    "resolve_device",
]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a model on one split: overall top-1, shot groups and per-class values (fractions)."""

    top1: float
    many: float
    medium: float
    few: float
    per_class: tuple[float, ...]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalars keyed ``{prefix}top1`` etc. (per-class values left out)."""
        return {f"{prefix}{k}": getattr(self, k) for k in ("top1", "many", "medium", "few")}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        msg = "run.device=cuda but CUDA is not available (torch.cuda.is_available() is False)"
        raise ValueError(msg)
    return torch.device(name)


@torch.no_grad()
def class_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   cfg: TrainConfig, device: torch.device, *, counter: Any = None,
                   collective: Collective = LOCAL) -> torch.Tensor:
    """Per-class accuracy (C,) of ``model`` over ``batches`` in eval mode.

    Counted by ``metrics.class_counter``: the C++ host counter on the CPU (the engine benchmark's ``acc_pass``
    point measures the choice), ``index_add_`` on the device elsewhere; ``counter`` overrides it. Non-finite
    logits count as wrong. Under torchrun ``batches`` are this rank's share: rank 0's buffers are broadcast
    first (every rank evaluates the same model) and the per-class counts are summed over ranks, so every rank
    returns the accuracy of the whole set.
    """
    was_training = model.training
    model.eval()
    collective.broadcast_buffers(model)
    counter = class_counter(num_classes, device) if counter is None else counter
    for x, y in batches:
        with _autocast(cfg, device):
            logits = model(_memory_format(x, cfg))
        counter.update(logits.float(), y)
    collective.sum_([counter.correct, counter.total])
    model.train(was_training)
    return counter.per_class_accuracy()


def evaluate(model: nn.Module, split: Any, bundle: DataBundle, cfg: TrainConfig, device: torch.device, *,
             collective: Collective = LOCAL, show_progress: bool = False) -> EvalResult:
    """Balanced top-1 and many/medium/few accuracies (groups from the training counts).

    Under torchrun every rank evaluates its share ``r, r + N, ...`` of ``split`` (`class_accuracy` sums the
    counts). ``show_progress``: a progress bar over the batches (on a terminal).
    """
    shard = split.subset(collective.shard_indices(len(split))) if collective.distributed else split
    bs = cfg.run.eval_batch
    batches = progress(eval_batches(shard, bundle, bs, device, cfg.data.crop_size), total=-(-len(shard) // bs),
                       desc="eval", images_per_item=bs, enabled=show_progress)
    acc = class_accuracy(model, batches, bundle.num_classes, cfg, device, collective=collective)
    return evaluate_from_accuracy(acc, split, bundle)


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.run.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.model.channels_last else x


def evaluate_from_accuracy(acc: torch.Tensor, split: Any, bundle: DataBundle) -> EvalResult:
    """EvalResult from a per-class accuracy vector already measured on ``split``."""
    per_class = acc.detach().float().cpu().numpy()  # sync point
    counts = np.bincount(split.labels, minlength=bundle.num_classes)
    present = counts > 0
    groups = group_accuracies(per_class[present], bundle.class_counts[present])
    top1 = float((per_class * counts).sum() / counts.sum())
    return EvalResult(top1, groups["many"], groups["medium"], groups["few"], tuple(float(a) for a in per_class))


def _checkpoint_model(cfg: TrainConfig, num_classes: int, state: dict[str, Any]) -> nn.Module:
    """The architecture of a checkpoint: the config's model, or for a stage-2 run its Stage2Head-headed twin."""
    if cfg.stage2.method != "none":
        return stage2_model(cfg, num_classes, state.get("tau"))
    return build_model(dataclasses.replace(cfg.model, pretrained=""), num_classes)


def evaluate_checkpoint(
    path: str | Path, *, split: str = "test", device: str = "auto", data_root: str | Path | None = None
) -> dict[str, Any]:
    """Rebuilds the run of checkpoint ``path`` and evaluates its model on ``split`` (val or test).

    Args:
        path: a checkpoint written by stage 1 (``engine.fit``) or stage 2.
        split: ``test`` or ``val``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        data_root: replaces the checkpoint's ``data.root`` (the data was moved or copied); relative paths are
            taken from the current directory.
    """
    state = load_checkpoint(path, map_location="cpu")
    cfg = config_from_dict(state["config"], source=str(path))
    data = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=str(data_root))
    run = dataclasses.replace(cfg.run, device=device, progress=False)
    cfg = resolve_paths(dataclasses.replace(cfg, data=data, run=run)).validate()
    check_names(cfg)
    dev = resolve_device(device)
    bundle = DATASETS.get(cfg.data.dataset)(cfg.data, cfg.data.seed)
    model = _checkpoint_model(cfg, bundle.num_classes, state).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        msg = f"checkpoint {path} does not match its own config's model: {err}"
        raise CheckpointError(msg) from err
    result = evaluate(model, getattr(bundle, split), bundle, cfg, dev)
    return {"checkpoint": str(path), "split": split, "epoch": state.get("epoch"), **result.as_dict(),
            "per_class": list(result.per_class)}
