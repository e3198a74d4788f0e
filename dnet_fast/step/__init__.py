"""The training step, by job: the device-lr SGD (`sgd`), state snapshot/restore (`snapshot`), capture/replay
(`capture`) and the finite-value guard (`health`)."""

from __future__ import annotations

from dnet_fast.step.capture import TrainStep, resolve_graph
from dnet_fast.step.health import FiniteGuard
from dnet_fast.step.sgd import DeviceLRSGD, init_momentum_buffers_, sgd_step_, tensor_lrs_
from dnet_fast.step.snapshot import ZERO_INIT_STATE, StateSnapshot, mutable_state, step_optimizers

__all__ = [
    "ZERO_INIT_STATE",
    "DeviceLRSGD",
    "FiniteGuard",
    "StateSnapshot",
    "TrainStep",
    "init_momentum_buffers_",
    "mutable_state",
    "resolve_graph",
    "sgd_step_",
    "step_optimizers",
    "tensor_lrs_",
]
