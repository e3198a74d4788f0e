"""The training stack of one run — model, main optimiser, loss, meta mode, step — built from config and counts.

No data is loaded here: the engine, every benchmark and the tests build the same stack from the same config,
whatever feeds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dnet_fast import distributed
from dnet_fast.config import TrainConfig
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.losses import PerSampleLoss, build_loss
from dnet_fast.meta import META_MODES, MetaMode, build_meta_mode
from dnet_fast.models import build_model, param_groups
from dnet_fast.step import DeviceLRSGD, TrainStep, resolve_graph

__all__ = ["TrainingStack", "build_optimizer", "build_stack"]

log = logging.getLogger(__name__)


@dataclass
class TrainingStack:
    """What one training iteration runs, on one device.

    Attributes:
        model: the classifier, in train mode.
        optimizer: its `DeviceLRSGD` (groups carry ``base_lr`` for ``schedule.apply_lr``).
        criterion: the per-sample loss.
        meta: the meta mode holding model, criterion and optimiser (and Difficulty-Net or V).
        step: the static-buffer step over ``meta``: CUDA-graphed on GPU, eager otherwise.
    """

    model: nn.Module
    optimizer: DeviceLRSGD
    criterion: PerSampleLoss
    meta: MetaMode
    step: TrainStep

    @property
    def device(self) -> torch.device:
        """Where the stack lives."""
        return self.meta.device


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> DeviceLRSGD:
    """The main SGD of ``cfg.optim`` over ``param_groups`` (loaded parameters at ``lr · pretrained_lr_mult``)."""
    o = cfg.optim
    groups = param_groups(model, o.lr, o.pretrained_lr_mult, o.weight_decay)
    for group in groups:
        group["base_lr"] = group["lr"]
    return DeviceLRSGD(
        groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, device=device
    )


def _forward(cfg: TrainConfig, model: nn.Module) -> nn.Module | None:
    """The compiled real forward when ``run.compile`` asks for one and the mode can use it."""
    if not cfg.run.compile:
        return None
    if META_MODES.get(cfg.meta.mode).needs_meta_batch:
        log.warning(
            "run.compile ignored for meta.mode=%s: its virtual and meta forwards use functional_call and "
            "forward-mode AD, which compiled modules do not support",
            cfg.meta.mode,
        )
        return None
    return torch.compile(model)


def _distributed_forward(cfg: TrainConfig, model: nn.Module, collective: Collective, graph: bool) -> nn.Module:
    """Under torchrun: the DDP module (compiled when ``run.compile`` applies) as the real forward."""
    ddp = distributed.data_parallel(model, collective, capture=graph)
    compiled = _forward(cfg, ddp)
    return ddp if compiled is None else compiled


def _graph(cfg: TrainConfig, device: torch.device, collective: Collective) -> bool:
    graph = resolve_graph(cfg.run.graph, device)
    reason = distributed.graph_fallback_reason(graph, collective)
    if reason is not None:
        if collective.is_main:
            log.warning("run.graph=%s: %s", cfg.run.graph, reason)
        return False
    return graph


def build_stack(
    cfg: TrainConfig, class_counts: np.ndarray, device: torch.device | str, *, collective: Collective = LOCAL
) -> TrainingStack:
    """Builds the stack of ``cfg`` (validated, names checked) for a dataset with ``class_counts`` (C,).

    Seeds torch with ``run.seed`` first: the model's and then the auxiliary net's initialisation are a pure
    function of the config. Build it before restoring a checkpoint (or call ``step.reset()`` afterwards). With a
    distributed ``collective`` (torchrun) the model gets SyncBatchNorm if ``model.sync_bn``, the real forward is
    its `DistributedDataParallel` module, the meta mode reduces through ``collective``, and the step is eager
    until the CUDA-graph step under DDP is verified (`distributed.graph_fallback_reason`).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.run.seed)  # model initialisation; Difficulty-Net's follows in the same stream
    num_classes = len(class_counts)
    model = build_model(cfg.model, num_classes).to(device)
    if collective.distributed:
        model = distributed.prepare_model(model, cfg, collective)
    optimizer = build_optimizer(cfg, model, device)
    criterion = build_loss(cfg.loss, class_counts, cfg.optim.epochs).to(device)
    graph, warmup = _graph(cfg, device, collective), {}
    if collective.distributed:
        forward = _distributed_forward(cfg, model, collective, graph)
        meta = build_meta_mode(cfg, model, criterion, optimizer, num_classes, forward=forward, collective=collective)
        warmup = {"warmup_iters": distributed.DDP_CAPTURE_WARMUP}  # used only by a capture
    else:
        meta = build_meta_mode(cfg, model, criterion, optimizer, num_classes, forward=_forward(cfg, model))
    step = TrainStep(
        meta, graph=graph, precision=cfg.run.precision, channels_last=cfg.model.channels_last, **warmup,
    )
    return TrainingStack(model, optimizer, criterion, meta, step)
