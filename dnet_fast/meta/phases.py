"""The named phases of one meta iteration: weights, driver loss, virtual step, meta loss, aux and real steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Params",
    "Weigher",
    "aux_step",
    "class_weights",
    "driver_loss",
    "meta_loss",
    "real_step",
    "scratch_buffers",
    "virtual_step",
    "weight_stats",
    "weighted_mean",
]

Params = dict[str, Tensor]
#: Maps the per-sample losses (B,) of the virtual forward to per-sample weights ω (B,) in the graph of the
#: auxiliary net (Difficulty-Net: ω_i = w_{y_i}, ignoring the losses; MWN: ω_i ∝ V(ℓ_i)).
Weigher = Callable[[Tensor], Tensor]

_EPS = 1e-12  # SPEC §5: t = 1 - a / (Σa + ε)


def weighted_mean(losses: Tensor, weights: Tensor, denominator: Tensor | None = None) -> Tensor:
    """L = Σ_i w_i ℓ_i / Z with Z = B (the Difficulty-Net reduction: divide by b, not by Σ w).

    Args:
        losses: (B,) per-sample losses.
        weights: (B,) per-sample weights.
        denominator: Z when the loss divides by its own class weights Σ_i v_{y_i}
            (``PerSampleLoss.denominator``); None means B.

    Raises:
        ValueError: ``losses`` is not (B,) or ``weights`` has another shape; a (B,1) × (B,) product would
            broadcast to (B, B) and silently lose the per-sample weights (SPEC §13 #2).
    """
    if losses.ndim != 1 or weights.shape != losses.shape:
        msg = f"per-sample weighting needs losses (B,) and weights (B,), got {tuple(losses.shape)} and {tuple(weights.shape)}"
        raise ValueError(msg)
    weighted = weights * losses  # (B,)
    return weighted.mean() if denominator is None else weighted.sum() / denominator


def class_weights(
    diffnet: nn.Module, acc: Tensor, normalize: str, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Class weights from Difficulty-Net (SPEC §1), computed in the net's own precision (≥ fp32).

    The same rule weighs the N items of any difficulty net: N = C classes here and for the absolute net, N = B
    samples for the sample-level net (``sum_to_C`` then means Σ w = B, a mean weight of 1 per sample).

    Args:
        diffnet: D(·; θ), (C,) accuracies → (C,) difficulties in (0, 1) (or N inputs → N difficulties).
        acc: (C,) per-class accuracy A (or the net's N inputs).
        normalize: ``sum_to_C`` (w = C·d/Σd) or ``none`` (w = d).
        temperature: T of ``sum_to_C``, an opt-in variant beyond the paper (``diffnet.temperature``):
            w = C·d^(1/T)/Σ d^(1/T), so w_max/w_min = (d_max/d_min)^(1/T). T = 1 is the paper's rule, computed
            without the power.

    Returns:
        (w, d): weights (C,) and the raw difficulties (C,), both in the autograd graph of θ.
    """
    with torch.autocast(acc.device.type, enabled=False):  # bf16 autocast must not reach the small MLP
        d = diffnet(acc)  # (C,)
    if normalize == "none":
        return d, d
    p = d if temperature == 1.0 else d ** (1.0 / temperature)  # (C,)
    return p * (p.numel() / p.sum()), d  # (C,), sums to C


def driver_loss(d: Tensor, acc: Tensor, *, relative: bool = True) -> Tensor:
    """L_dr = mean_c (t_c − d_c)² on the difficulties before normalisation (SPEC §5, paper Eq. 7).

    Args:
        d: (N,) raw difficulties.
        acc: (N,) accuracies a (constants: no gradient flows into them).
        relative: t = 1 − a/(Σa + 1e-12), Eq. 7's target on the normalised accuracy â (all ones if A = 0);
            False: t = 1 − a, the absolute difficulty of CDB-CE (paper §3.1), a function of a_c alone.
    """
    target = 1.0 - (acc / (acc.sum() + _EPS) if relative else acc)  # (N,)
    return F.mse_loss(d, target)


def weight_stats(w: Tensor, d: Tensor) -> dict[str, Tensor]:
    """Detached weight_min, weight_max and E = −(1/C) Σ log(C·d_c/Σd) (SPEC §1, paper Fig. 3)."""
    with torch.no_grad():
        e = -torch.log(d * (d.numel() / d.sum())).mean()
        return {"weight_min": w.min(), "weight_max": w.max(), "weight_E": e}


def scratch_buffers(model: nn.Module) -> Params:
    """Throw-away copies of the model's buffers.

    Virtual and meta forwards run in train mode (batch statistics) like the real forward, but their BatchNorm
    running-statistics updates must land somewhere that is discarded (SPEC §4.3).
    """
    return {name: b.clone() for name, b in model.named_buffers()}


def virtual_step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], lrs: Mapping[str, Any]
) -> Params:
    """φ̂ = φ − α g per parameter (Eq. 9): plain SGD, no momentum or weight decay; a missing g leaves φ as is.

    Args:
        params: φ by name.
        grads: g by name (None where the loss does not depend on the parameter).
        lrs: α by name, the current lr of the parameter's optimizer group (float or 0-d tensor; a device
            tensor, as `dnet_fast.step.DeviceLRSGD` holds, is read on the device, so schedules need no re-capture).
    """
    return {n: p if grads[n] is None else p - lrs[n] * grads[n] for n, p in params.items()}


def meta_loss(
    model: nn.Module, params_hat: Mapping[str, Tensor], meta_batch: tuple[Tensor, Tensor]
) -> Tensor:
    """L_meta = mean CE of f(x^m; φ̂) on the balanced meta batch, train-mode BN with throw-away buffers."""
    xm, ym = meta_batch
    state = (dict(params_hat), scratch_buffers(model))
    logits = functional_call(model, state, (xm,))  # (m, C)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), ym)


def real_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """Eq. 11: zero the grads, backward ``loss`` into φ, one step of the main optimiser.

    Gradients are set to None first: inside a captured CUDA graph, backward then allocates them from the graph's
    pool at capture and every replay overwrites them.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def aux_step(
    optimizer: torch.optim.Optimizer,
    roots: list[Tensor],
    grads: list[Tensor | None],
    average: Callable[[list[Tensor | None]], Sequence[Tensor | None]] | None = None,
) -> None:
    """Eq. 10 for the auxiliary net: backward Σ_k ⟨roots_k, grads_k⟩ into its parameters only, one step.

    Args:
        optimizer: the auxiliary net's optimiser (Adam for Difficulty-Net).
        roots, grads: the backward roots and their gradients (None: ones).
        average: under torchrun, the mean over ranks (``Collective.mean``) applied to the parameters'
            gradients between the backward and the step; None on one process.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    pairs = [(r, g) for r, g in zip(roots, grads, strict=True) if r.requires_grad]  # detached roots add 0
    optimizer.zero_grad(set_to_none=True)
    if pairs:
        torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs], inputs=params)
    if average is not None:
        for p, g in zip(params, average([p.grad for p in params]), strict=True):
            p.grad = g
    optimizer.step()
