"""Loading torchvision-layout checkpoints into our backbones, and the pretrained/new optimiser split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_pretrained", "param_groups", "read_state_dict"]

# Checkpoints written before PyTorch 0.4.1 (torchvision's original ResNet files among them) lack these
# BatchNorm counters; the model keeps its own value.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_SHOWN = 5  # key names listed per problem in error messages


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a flat ``name -> tensor`` state dict with ``torch.load(..., weights_only=True)`` on the CPU.

    Raises:
        ValueError: the file is missing, unreadable, or not a flat dict of tensors (the message names the file).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises a zoo of types (OSError, RuntimeError, UnpicklingError, EOFError, ...) for bad files;
    # callers only need "this file is not a usable checkpoint".
    except Exception as err:
        msg = f"pretrained checkpoint {path}: cannot be read ({type(err).__name__}: {err})"
        raise ValueError(msg) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"pretrained checkpoint {path}: expected a flat dict of tensors (torchvision layout), got {type(state).__name__}"
        raise ValueError(msg)
    return dict(state)


def _problems(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    def listed(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
        return ", ".join(sorted(names)[:_SHOWN]) + more

    missing = [k for k in expected if k not in loaded and not k.endswith(_OPTIONAL_SUFFIXES)]
    extra = [k for k in loaded if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in loaded.items()
        if k in expected and v.shape != expected[k].shape
    ]
    found = [("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shapes)]
    return [f"{what}: {listed(names)}" for what, names in found if names]


def load_pretrained(model: nn.Module, path: str | Path) -> frozenset[str]:
    """Loads a torchvision-layout checkpoint into ``model``, skipping the keys its architecture replaces.

    The skipped prefixes come from ``model.pretrained_skip`` (``("fc.",)`` by default; the Places-LT ResNet-152
    also skips ``layer4.2.``), on both sides. The names of the loaded *parameters* are stored on the model as
    ``model.pretrained_names`` (read by :func:`param_groups`) and returned.

    Raises:
        ValueError: unreadable file, or missing / unexpected / mis-shaped keys (the message names the file).
    """
    skip = tuple(getattr(model, "pretrained_skip", ("fc.",)))
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(skip)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    problems = _problems(state, expected)
    if problems:
        msg = f"pretrained checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(problems)
        raise ValueError(msg)
    model.load_state_dict(state, strict=False)
    names = frozenset(name for name, _ in model.named_parameters() if name in state)
    model.pretrained_names = names
    return names


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps as `_orig_mod`, (Distributed)DataParallel as `module`; names must match the inner model.
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def param_groups(
    model: nn.Module, lr: float, pretrained_lr_mult: float = 1.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: loaded parameters at ``lr * pretrained_lr_mult``, the rest at ``lr``.

    Every parameter appears exactly once; an empty group is dropped. Groups carry a ``name`` ("pretrained" or
    "new"). Places-LT: lr 0.01 with mult 0.1 gives the backbone 0.001 and the extra block and head 0.01.

    Args:
        model: the classifier (compiled or DDP-wrapped models are unwrapped); loaded names come from its
            ``pretrained_names`` attribute (absent = nothing loaded).
        lr: learning rate of freshly initialised parameters.
        pretrained_lr_mult: factor applied to ``lr`` for loaded parameters.
        weight_decay: weight decay of both groups.
    """
    inner = _unwrap(model)
    loaded = getattr(inner, "pretrained_names", frozenset())
    split: dict[str, list[nn.Parameter]] = {"pretrained": [], "new": []}
    for name, p in inner.named_parameters():
        split["pretrained" if name in loaded else "new"].append(p)
    rates = {"pretrained": lr * pretrained_lr_mult, "new": lr}
    return [
        {"name": name, "params": params, "lr": rates[name], "weight_decay": weight_decay}
        for name, params in split.items()
        if params
    ]
