"""The naive exact reference: the paper's meta step written the correct-but-slow way (model copy, double backward).

The official code's own iterations, which the speed-ups are quoted against, are ``benchmarks/official.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NaiveExactStep", "NaiveState", "class_weights", "driver_loss", "swap_params"]

#: ε of the driver-loss target t = 1 - a / (Σa + ε) (SPEC §5).
_TARGET_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Shared pieces (written from SPEC §1 and §5; the fast modes have their own)


def driver_loss(d: Tensor, acc: Tensor) -> Tensor:
    """L_dr = mean_c (t_c - d_c)², t = 1 - a / (Σa + ε), on the difficulties before normalisation (SPEC §5)."""
    target = 1 - acc / (acc.sum() + _TARGET_EPS)
    return F.mse_loss(d, target)


def class_weights(d: Tensor) -> Tensor:
    """w = C·d / Σd (sum-to-C normalisation, SPEC §1); keeps whatever graph ``d`` has."""
    return d / d.sum() * d.numel()


def swap_params(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Replaces parameters by plain tensors, walking dotted names with setattr.

    This is the reflection-based "MetaModule" trick of the released code (STYLE §4.1 names it as a
    counter-example): the module then computes with non-leaf tensors that carry the virtual step's graph.
    """
    for name, value in tensors.items():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        owner._parameters.pop(leaf, None)  # a Parameter slot refuses a non-leaf tensor; drop it first
        setattr(owner, leaf, value)


# ----------------------------------------------------------------------------------------------------------
# The reference iteration


@dataclass
class NaiveState:
    """What a naive iteration reads and updates.

    Attributes:
        model: the trained classifier f(·; φ), in train mode.
        diffnet: Difficulty-Net D(·; θ).
        optimizer: main optimiser over ``model``'s parameters (its group lr is also the virtual-step size).
        diff_optimizer: Adam over ``diffnet``'s parameters.
        acc: (C,) per-class accuracy A, fixed for the epoch.
        lambda_dr: driver-loss weight λ.
        criterion: per-sample loss, (B, C), (B,) → (B,).
    """

    model: nn.Module
    diffnet: nn.Module
    optimizer: torch.optim.Optimizer
    diff_optimizer: torch.optim.Optimizer
    acc: Tensor
    lambda_dr: float = 0.3
    criterion: Callable[[Tensor, Tensor], Tensor] = field(
        default=lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    )

    @property
    def num_classes(self) -> int:
        """C."""
        return self.acc.numel()

    def param_lrs(self) -> list[float]:
        """Learning rate of each model parameter, in ``model.parameters()`` order (virtual-step sizes)."""
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return [lr_of[id(p)] for p in self.model.parameters()]

    def real_step(self, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Eq. 11: weighted loss on (x, y) with per-sample weights w (B,); zero grads, backward, step.

        Returns:
            (B, C) logits of the real forward (detached).
        """
        logits = self.model(x)
        loss = (self.criterion(logits, y) * w).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return logits.detach()


class NaiveExactStep:
    """One `exact` iteration (SPEC §4.3) written the correct-but-slow way.

    Per call: deep-copy the model; class weights w = C·D(A; θ)/Σ kept in the graph; virtual step φ̂ = φ - α∇φ L_w
    with ``create_graph=True`` written into the copy by name; meta CE on the copy plus λ·L_dr; a plain double
    backward for ∂J/∂θ; Adam on θ; then the real step (fresh forward) with weights from the updated θ. The copy's
    forwards run in train mode and absorb their running-statistics updates, so only the real forward changes the
    model's BatchNorm buffers.

    Args:
        state: model, Difficulty-Net, optimisers, A, λ.
    """

    def __init__(self, state: NaiveState) -> None:
        self.s = state

    def meta_objective(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor]) -> Tensor:
        """J(θ) = CE(f(x^m; φ̂(θ)), y^m) + λ·L_dr(A, θ) at the current φ, on a throw-away copy of the model."""
        s = self.s
        model_cpy = copy.deepcopy(s.model)
        model_cpy.train()
        d = s.diffnet(s.acc)
        w = class_weights(d)[y]  # (B,), in θ's graph
        loss = (s.criterion(model_cpy(x), y) * w).mean()
        named = list(model_cpy.named_parameters())
        grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=True)
        lrs = s.param_lrs()
        swap_params(model_cpy, {n: p - lr * g for (n, p), g, lr in zip(named, grads, lrs, strict=True)})
        xm, ym = meta_batch
        return F.cross_entropy(model_cpy(xm), ym) + s.lambda_dr * driver_loss(d, s.acc)

    def step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor]) -> None:
        """One training iteration on (x (B, 3, H, W), y (B,)) with a balanced meta batch (x^m, y^m)."""
        s = self.s
        theta = list(s.diffnet.parameters())
        grads = torch.autograd.grad(self.meta_objective(x, y, meta_batch), theta)
        for p, g in zip(theta, grads, strict=True):
            p.grad = g
        s.diff_optimizer.step()
        with torch.no_grad():
            w = class_weights(s.diffnet(s.acc))[y]
        s.real_step(x, y, w)
