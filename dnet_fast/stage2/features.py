"""Features of the frozen stage-1 backbone for stage 2: BatchNorm modes, epoch lengths, cached and streamed batches.

The backbone never trains in stage 2: its parameters are excluded from the optimiser and its forward runs under
``no_grad``. Its BatchNorm layers are in eval mode (statistics frozen) except under shift BN, where the layers
named by ``BN_MODES`` run in train mode so that their running statistics follow the class-balanced stage-2 data
(their batch statistics are then also what the forward uses, as in MiSLAS).

Where the features are a fixed function of the image (no augmentation, frozen BatchNorm) they are computed once
and the classifier trains on gathers of that cache (:class:`CachedFeatures`); otherwise every batch runs the
backbone (:class:`StreamedFeatures`). Both draw the same class-balanced order from ``sampling.epoch_order``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dnet_fast.config import TrainConfig
from dnet_fast.data import LoaderSpec
from dnet_fast.data.loaders import epoch_indices, num_batches
from dnet_fast.registry import Registry

__all__ = [
    "BN_MODES",
    "EPOCH_LENGTHS",
    "CachedFeatures",
    "FeatureBank",
    "StreamedFeatures",
    "backbone_features",
    "extract_bank",
    "set_stage2_modes",
]

#: ``stage2.las_bn`` value -> ``fn(model) -> BatchNorm layers that run in train mode during stage 2``.
BN_MODES: Registry[Callable[[nn.Module], list[nn.Module]]] = Registry("stage-2 BatchNorm mode")

#: ``stage2.epoch_length`` value -> ``fn(class_counts (C,), batch_size) -> samples per epoch``.
EPOCH_LENGTHS: Registry[Callable[[np.ndarray, int], int]] = Registry("stage-2 epoch length")


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@BN_MODES.register("frozen")
def _frozen(model: nn.Module) -> list[nn.Module]:  # noqa: ARG001  (same signature as every mode)
    """No layer: the backbone runs in eval mode, its statistics stay those of stage 1."""
    return []


@BN_MODES.register("shift")
def _shift(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of the backbone (MiSLAS ImageNet-LT: the model in train mode)."""
    return _batchnorms(model)


@BN_MODES.register("shift_extra_block")
def _shift_extra_block(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of the extra block only (official Places-LT: backbone eval, block train)."""
    block = getattr(model, "extra_block", None)
    if block is None:
        msg = (f"stage2.las_bn=shift_extra_block needs a backbone with an extra block (places_resnet152); "
               f"{type(model).__name__} has none")
        raise ValueError(msg)
    return _batchnorms(block)


def set_stage2_modes(model: nn.Module, shifted: Iterable[nn.Module]) -> None:
    """Eval mode everywhere except the ``shifted`` BatchNorm layers (train mode: running statistics update)."""
    model.eval()
    for m in shifted:
        m.train()


@EPOCH_LENGTHS.register("classes_x_max")
def _classes_x_max(class_counts: np.ndarray, batch_size: int) -> int:  # noqa: ARG001
    """C·n_max samples, C the non-empty classes (the length of the official ``ClassAwareSampler``)."""
    counts = np.asarray(class_counts)
    return int((counts > 0).sum() * counts.max())


@EPOCH_LENGTHS.register("dataset_plus_one")
def _dataset_plus_one(class_counts: np.ndarray, batch_size: int) -> int:
    """(⌈N/B⌉ + 1)·B samples: MiSLAS's loop breaks after batch index ⌈N/B⌉ (``if i > end_steps``)."""
    return (math.ceil(int(np.sum(class_counts)) / batch_size) + 1) * batch_size


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.run.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def backbone_features(model: nn.Module, x: Tensor, cfg: TrainConfig) -> Tensor:
    """Pooled features (B, F) float32 of images (B, 3, H, W); no graph, modes as the caller set them."""
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(cfg, x.device):
        return model.forward_features(x).float()


@dataclass(frozen=True)
class FeatureBank:
    """Features of every sample of a split, in split order, on the device.

    Attributes:
        features: (N, F) float32.
        labels: (N,) int64.
        seconds: wall time of the backbone pass that computed them.
    """

    features: Tensor
    labels: Tensor
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, labels) in consecutive chunks of ``size`` (the last one partial)."""
        for i in range(0, len(self), size):
            yield self.features[i : i + size], self.labels[i : i + size]


def extract_bank(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], cfg: TrainConfig) -> FeatureBank:
    """Runs the backbone (eval mode) over ``batches`` once; the model's modes are restored afterwards."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    start, feats, labels = time.perf_counter(), [], []
    for x, y in batches:
        feats.append(backbone_features(model, x, cfg))
        labels.append(y)
    for m, mode in was_training.items():
        m.train(mode)
    features = torch.cat(feats)
    if features.device.type == "cuda":
        torch.cuda.synchronize(features.device)  # sync point: the pass's time
    return FeatureBank(features, torch.cat(labels), time.perf_counter() - start)


class CachedFeatures:
    """Class-balanced batches gathered from a :class:`FeatureBank` of the train split (no backbone forward).

    Args:
        bank: features of every train sample, computed once with the eval transform.
        labels: (N,) int64 train labels on the host (the sampler's input).
        spec: the train loader's spec (batch size, seed, ``class_aware`` order, epoch length).
    """

    def __init__(self, bank: FeatureBank, labels: np.ndarray, spec: LoaderSpec) -> None:
        self.bank, self.labels, self.spec = bank, labels, spec

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.spec)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(features (B, F), labels (B,)) of ``epoch``; the last partial batch dropped, as the loaders do."""
        bs = self.spec.batch_size
        order = torch.from_numpy(epoch_indices(self.labels, self.spec, epoch)).to(self.bank.labels.device)
        for b in range(len(self)):
            idx = order[b * bs : (b + 1) * bs]  # (B,)
            yield self.bank.features[idx], self.bank.labels[idx]


class StreamedFeatures:
    """Class-balanced batches from a train loader, each through the frozen backbone.

    Args:
        loader: a ``dnet_fast.data`` loader whose spec uses the ``class_aware`` order.
        model: the classifier network (``forward_features`` is used); its modes are set by the caller.
        cfg: precision and memory format of the forward.
    """

    def __init__(self, loader: Any, model: nn.Module, cfg: TrainConfig) -> None:
        self.loader, self.model, self.cfg = loader, model, cfg

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(features (B, F), labels (B,)) of ``epoch``."""
        for x, y in self.loader.batches(epoch):
            yield backbone_features(self.model, x, self.cfg), y
