"""The main optimiser of the step: SGD whose learning rates are device tensors, updated without a host sync.

torch.optim.SGD (2.4 ... 2.13) accepts a tensor lr, but its single-tensor and foreach paths apply it as
``param.add_(grad, alpha=-lr)``: turning the tensor into a Scalar is an ``.item()``, a host sync that fails under
capture (pytorch/pytorch #106802). Only ``fused=True`` passes lr to the kernel as a device pointer; it is a
different kernel with its own rounding and its own first-step branch. `sgd_step_` is the foreach update with the
tensor lr applied by ``_foreach_mul`` / ``_foreach_sub_``; `DeviceLRSGD` is the optimiser that runs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DeviceLRSGD", "init_momentum_buffers_", "sgd_step_", "tensor_lrs_"]


def _lr_dtype(group: dict[str, Any]) -> torch.dtype:
    """The dtype of a group's lr tensor: its parameters' dtype, at least float32 (α·g in the params' precision)."""
    return torch.promote_types(torch.float32, group["params"][0].dtype)


def tensor_lrs_(optimizer: torch.optim.Optimizer, device: torch.device | str) -> list[Tensor]:
    """Replaces every group's ``lr`` by a 0-d tensor on ``device`` (in place in the group dict); returns them.

    A group whose lr already is such a tensor keeps it (its address may be captured). ``schedule.apply_lr`` then
    updates the tensors with ``fill_``, so a schedule change needs no re-capture; the virtual step α of the meta
    modes reads the same tensors.
    """
    device = torch.device(device)
    lrs = []
    for group in optimizer.param_groups:
        lr, dtype = group["lr"], _lr_dtype(group)
        if not (isinstance(lr, Tensor) and lr.ndim == 0 and lr.device == device and lr.dtype == dtype):
            # sync point (build time only): a tensor lr loaded from a checkpoint is read once
            group["lr"] = torch.tensor(float(lr), device=device, dtype=dtype)
        lrs.append(group["lr"])
    return lrs


def _check_sgd_group(group: dict[str, Any]) -> None:
    if group.get("dampening", 0) != 0:
        msg = "sgd_step_ supports dampening=0 only (zero-initialised momentum then equals torch's first step)"
        raise ValueError(msg)
    if group.get("differentiable", False):
        msg = "sgd_step_ does not support differentiable=True"
        raise ValueError(msg)


def init_momentum_buffers_(optimizer: torch.optim.Optimizer) -> None:
    """Creates missing ``momentum_buffer`` states as zeros, before any capture, so their addresses are fixed.

    With dampening 0, ``0·μ + g = g`` bit for bit, so a zero buffer behaves exactly as torch's first-step
    ``buf = g.clone()``; checkpoints keep torch's state layout.
    """
    for group in optimizer.param_groups:
        _check_sgd_group(group)
        if group.get("momentum", 0) == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def sgd_step_(optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` (a ``torch.optim.SGD``) in place, reading tensor lrs on the device.

    Same update as ``torch.optim.SGD`` (coupled weight decay, momentum, Nesterov, maximize; dampening 0): every
    state tensor is updated in place, nothing is rebound after `init_momentum_buffers_`, and no value is read on
    the host, so the step can be captured. Bit-identical to torch when α·g is exact (e.g. power-of-two lrs);
    otherwise torch fuses p − α·g into one FMA and the results may differ in the last bit.

    Raises:
        ValueError: dampening ≠ 0, differentiable groups or sparse gradients.
    """
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        _check_sgd_group(group)
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            msg = "sgd_step_ does not support sparse gradients"
            raise ValueError(msg)
        if group.get("maximize", False):
            grads = torch._foreach_neg(grads)
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)  # out of place: p.grad stays ∇L
        if momentum != 0:
            bufs = [_momentum_buffer(optimizer, p) for p in params]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        _descend_(params, grads, group["lr"])


def _momentum_buffer(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor:
    state = optimizer.state[p]
    buf = state.get("momentum_buffer")
    if buf is None:  # eager use without init_momentum_buffers_; never reached inside a capture
        buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return buf


def _descend_(params: list[Tensor], updates: list[Tensor], lr: float | Tensor) -> None:
    """p ← p − lr·u; a tensor lr stays on the device (no ``alpha=`` Scalar, which would call ``.item()``)."""
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(updates, lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


class DeviceLRSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (same arguments, same state layout) whose ``step`` is `sgd_step_`.

    Every group's lr is a 0-d tensor on ``device`` and the momentum buffers exist from the start, so the step
    reads nothing on the host and can be captured in a CUDA graph. `load_state_dict` re-establishes both (torch
    replaces the lrs and state tensors it loads); a captured step must then be reset (``TrainStep.reset``).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.SGD``.
        device: where the lr tensors live (the parameters' device).
        **kwargs: ``lr``, ``momentum``, ``weight_decay``, ``nesterov``, ``maximize`` (dampening must be 0).
    """

    def __init__(self, params: Any, *, device: torch.device | str, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.device = torch.device(device)
        self._bind()

    def _bind(self) -> None:
        tensor_lrs_(self, self.device)
        init_momentum_buffers_(self)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One in-place update (`sgd_step_`); ``closure`` is not supported."""
        if closure is not None:
            msg = "DeviceLRSGD.step does not take a closure"
            raise ValueError(msg)
        sgd_step_(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then lrs back to device tensors and momentum buffers present."""
        super().load_state_dict(state_dict)
        self._bind()
