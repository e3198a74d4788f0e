"""The model registry (MODELS), ``build_model`` and the networks: CIFAR/ImageNet ResNets, heads, DifficultyNet."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dnet_fast.config import ModelConfig
from dnet_fast.models import cifar_resnet, resnet
from dnet_fast.models.difficulty_net import DifficultyNet, MetaWeightNet
from dnet_fast.models.heads import HEADS, CosineClassifier, build_head
from dnet_fast.models.pretrained import load_pretrained, param_groups, read_state_dict
from dnet_fast.registry import Registry

__all__ = [
    "HEADS",
    "MODELS",
    "CosineClassifier",
    "DifficultyNet",
    "MetaWeightNet",
    "ModelBuilder",
    "build_head",
    "build_model",
    "load_pretrained",
    "param_groups",
    "read_state_dict",
]

#: ``fn(num_classes, *, head, head_scale, width, **ignored) -> nn.Module``
ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")

for _module, _names in (
    (cifar_resnet, ("resnet20", "resnet32", "resnet44", "resnet56")),
    (resnet, ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "places_resnet152")),
):
    for _name in _names:
        MODELS.register(_name)(getattr(_module, _name))


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Builds ``cfg.backbone`` with its head, loads ``cfg.pretrained`` and applies channels_last if asked.

    Builds on the current default device (e.g. inside ``with torch.device("meta")``). The returned model has
    ``pretrained_names``: the parameter names loaded from the checkpoint (empty without one).

    Raises:
        UnknownNameError: unknown backbone.
        ValueError: unknown head, or an unusable pretrained checkpoint (the message names the file).
    """
    builder = MODELS.get(cfg.backbone)
    model = builder(num_classes, head=cfg.head, head_scale=cfg.head_scale, width=cfg.width)
    model.pretrained_names = frozenset()
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
