"""The meta-gradient: ∂L_meta(φ̂(ω))/∂ω by one jvp (fast) or by the plain double backward (reference)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.meta.forward_ad import ClosedFormBatchNorm, quiet_jvp
from dnet_fast.meta.phases import (
    Params,
    Weigher,
    meta_loss,
    scratch_buffers,
    virtual_step,
    weighted_mean,
)
from dnet_fast.registry import Registry

__all__ = [
    "META_GRADIENTS",
    "Algorithm",
    "Inner",
    "MetaGrad",
    "forward_ad_problem",
    "functional_layout",
    "loss_jvp",
    "meta_gradient",
    "meta_gradient_double_backward",
    "meta_gradient_jvp",
    "needs_losses",
    "scratch_losses",
]


def functional_layout(x: Tensor) -> Tensor:
    """The batch as the jvp path's functional passes read it: channels_last for 4-D CPU tensors.

    oneDNN runs CPU convolutions and BatchNorm on NHWC without the reorders it needs for NCHW: on a 1-thread
    CPU ResNet-32 (batch 128, 32 px) a forward took 141 ms instead of 200 and a backward 260 instead of 334. The
    layout propagates from the input through every layer, so the model and its parameters stay as they are.
    Used by the meta forward/backward and `loss_jvp` only: the real forward keeps the caller's layout (its
    rounding is that of the other modes), and the double-backward reference keeps it too (its ``create_graph``
    backward got slower in NHWC, 2.9 s instead of 2.4 s per step). CUDA tensors are left alone (not measured).

    Args:
        x: (B, 3, H, W) images, or any other tensor (returned unchanged).
    """
    if x.ndim == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


class Inner(NamedTuple):
    """The inner problem of one iteration: the classifier at φ_t, its step sizes and its training batch.

    Under torchrun x, y are this rank's share of the global batch, ``denominator`` is the rank's Z/N and
    ``collective`` averages what the meta-gradient computes over ranks (`dnet_fast.distributed`).
    """

    model: nn.Module
    criterion: nn.Module  # per-sample loss, (B, C) logits → (B,)
    params: Params  # φ_t: the parameters the main optimiser updates
    lrs: dict[str, Any]  # α per parameter name (float or 0-d tensor)
    x: Tensor  # (B, 3, H, W)
    y: Tensor  # (B,)
    denominator: Tensor | None  # Z of the reduction (None: B), see ``PerSampleLoss.denominator``
    collective: Collective = LOCAL  # the ranks' reductions; a no-op on one process


class MetaGrad(NamedTuple):
    """The meta term as backward roots: ∇_θ L_meta = Σ_k (∂roots_k/∂θ)ᵀ grad_tensors_k."""

    meta_loss: Tensor  # detached scalar L_meta at φ̂
    roots: list[Tensor]
    grad_tensors: list[Tensor]


def scratch_losses(inner: Inner, params: Mapping[str, Tensor]) -> Tensor:
    """Per-sample losses ℓ(φ) (B,) of a train-mode forward at ``params`` that leaves the model's buffers alone."""
    state = (dict(params), scratch_buffers(inner.model))
    logits = functional_call(inner.model, state, (inner.x,))  # (B, C)
    return inner.criterion(logits, inner.y)


def meta_gradient_double_backward(
    inner: Inner, weigh: Weigher, meta_batch: tuple[Tensor, Tensor]
) -> MetaGrad:
    """The plain reference: g = ∇_φ L_w with ``create_graph``, φ̂ = φ − αg, L_meta(φ̂) is the backward root.

    The virtual forward uses throw-away BN buffers, so the real forward still has to run afterwards. Under
    torchrun g is the mean over ranks in value (local in its graph), and the roots are φ̂ with
    v = mean_r ∂L_meta_r/∂φ̂ (`_averaged_roots`).
    """
    losses = scratch_losses(inner, inner.params)  # (B,)
    names = list(inner.params)
    grads = torch.autograd.grad(
        weighted_mean(losses, weigh(losses), inner.denominator),
        [inner.params[n] for n in names],
        create_graph=True,
        allow_unused=True,
    )
    grads = inner.collective.mean_keep_graph(grads)  # Eq. 9 on the global batch (unchanged on one process)
    params_hat = virtual_step(inner.params, dict(zip(names, grads, strict=True)), inner.lrs)
    l_meta = meta_loss(inner.model, params_hat, meta_batch)
    if inner.collective.distributed:
        return _averaged_roots(inner.collective, params_hat, l_meta)
    return MetaGrad(l_meta.detach(), [l_meta], [torch.ones_like(l_meta)])


def _averaged_roots(collective: Collective, params_hat: Params, l_meta: Tensor) -> MetaGrad:
    """The double backward's roots on N ranks: φ̂ with gradient v = mean_r ∂L_meta_r/∂φ̂.

    Every rank's φ̂ is built from the mean of all ranks' gradients, so each L_meta_r depends on every rank's ω;
    backing the local L_meta alone into θ would miss the other ranks' meta batches. With v averaged, the mean
    over ranks of the θ-gradients (`aux_step`'s ``average``) is ∂(mean_r L_meta_r)/∂θ.
    """
    hats = list(params_hat.values())
    v = torch.autograd.grad(l_meta, hats, retain_graph=True, allow_unused=True)
    v = [torch.zeros_like(h) if g is None else g for h, g in zip(hats, v, strict=True)]
    *v, value = collective.mean([*v, l_meta.detach()])
    return MetaGrad(value, hats, v)


def loss_jvp(inner: Inner, tangents: Mapping[str, Tensor]) -> Tensor:
    """s_i = uᵀ ∇_φ ℓ_i(φ_t) for every sample at once: one forward-mode pass (train-mode BN, throw-away buffers).

    The batch statistics depend on φ, so s includes the path through them, as the double backward does.
    Train-mode BatchNorm runs through `ClosedFormBatchNorm`: the running statistics of this pass are discarded
    anyway, and torch's generic BN tangent formula was about a quarter of the whole exact step on CPU. x enters
    in `functional_layout`.

    Args:
        inner: the inner problem (φ_t, x, y).
        tangents: u by parameter name, shaped like the parameters.
    """
    # scratch_losses clones the buffers inside the transformed function: functorch forbids in-place updates
    # (num_batches_tracked) of tensors captured from outside.
    primals = {n: p.detach() for n, p in inner.params.items()}
    inner = inner._replace(x=functional_layout(inner.x))
    with torch.no_grad(), ClosedFormBatchNorm():  # forward-mode only; no reverse graph needed
        _, s = quiet_jvp(lambda params: scratch_losses(inner, params), (primals,), (dict(tangents),))
    return s  # (B,)


def meta_gradient_jvp(
    inner: Inner, losses: Tensor, weigh: Weigher, meta_batch: tuple[Tensor, Tensor]
) -> MetaGrad:
    """The fast meta-gradient: ∂L_meta/∂ω_i = −(1/Z)·uᵀ∇_φℓ_i with u = α ⊙ ∂L_meta/∂φ̂ (no double backward).

    φ̂ = φ − α (1/Z) Σ_i ω_i ∇_φℓ_i is linear in ω, so dφ̂/dω_i = −(α/Z) ∇_φℓ_i; the b products uᵀ∇_φℓ_i are one
    JVP (`loss_jvp`) and θ gets them through an ordinary backward of ω. The meta forward reads x^m in
    `functional_layout`. Under torchrun g, v = ∂L_meta/∂φ̂ and L_meta are averaged over ranks
    (``inner.collective``): φ̂ and u are those of the global batch, s and ω stay local, and Z is the rank's Z/N.

    Args:
        inner: the inner problem.
        losses: (B,) per-sample losses of the shared train forward (real buffers); its graph is retained for the
            real step's backward.
        weigh: losses → ω (B,) in the graph of the auxiliary net.
        meta_batch: balanced (x^m, y^m).
    """
    omega = weigh(losses)  # (B,)
    names = list(inner.params)
    # First-order g: ω enters as a constant here; its influence on φ̂ is linear and handled through s below.
    grads = torch.autograd.grad(
        weighted_mean(losses, omega.detach(), inner.denominator),
        [inner.params[n] for n in names],
        retain_graph=True,
        allow_unused=True,
    )
    grads = inner.collective.mean(grads)  # Eq. 9 on the global batch (unchanged on one process)
    with torch.no_grad():
        params_hat = virtual_step(inner.params, dict(zip(names, grads, strict=True)), inner.lrs)
    params_hat = {n: p.detach().requires_grad_() for n, p in params_hat.items()}
    xm, ym = meta_batch
    l_meta = meta_loss(inner.model, params_hat, (functional_layout(xm), ym))
    v = torch.autograd.grad(l_meta, [params_hat[n] for n in names], allow_unused=True)  # ∂L_meta/∂φ̂
    *v, l_value = inner.collective.mean([*v, l_meta.detach()])  # over every rank's meta batch
    u = {
        n: torch.zeros_like(params_hat[n]) if g is None else inner.lrs[n] * g
        for n, g in zip(names, v, strict=True)
    }
    s = loss_jvp(inner, u)  # (B,)
    z = losses.shape[0] if inner.denominator is None else inner.denominator
    return MetaGrad(l_value, [omega], [-s / z])


class Algorithm(NamedTuple):
    """A meta-gradient algorithm of ``META_GRADIENTS``."""

    fn: Callable[[Inner, Tensor | None, Weigher, tuple[Tensor, Tensor]], MetaGrad]
    needs_losses: bool  # reuses the losses of the shared train forward (the mode runs that forward first)


#: ``meta.grad`` name -> Algorithm.
META_GRADIENTS: Registry[Algorithm] = Registry("meta-gradient algorithm")
META_GRADIENTS.register("jvp")(Algorithm(meta_gradient_jvp, needs_losses=True))
META_GRADIENTS.register("double_backward")(
    Algorithm(lambda inner, _losses, weigh, mb: meta_gradient_double_backward(inner, weigh, mb), needs_losses=False)
)


def needs_losses(algorithm: str) -> bool:
    """Whether ``META_GRADIENTS[algorithm]`` reuses the shared train forward's losses."""
    return META_GRADIENTS.get(algorithm).needs_losses


def meta_gradient(
    inner: Inner, losses: Tensor | None, weigh: Weigher, meta_batch: tuple[Tensor, Tensor], algorithm: str
) -> MetaGrad:
    """``META_GRADIENTS[algorithm]``: `meta_gradient_jvp` (needs ``losses``) or `meta_gradient_double_backward`.

    Raises:
        UnknownNameError: unknown algorithm.
        ValueError: the algorithm needs the shared forward's ``losses`` and got None.
    """
    if losses is None and needs_losses(algorithm):
        msg = f"the {algorithm} meta-gradient needs the losses of the shared train forward"
        raise ValueError(msg)
    return META_GRADIENTS.get(algorithm).fn(inner, losses, weigh, meta_batch)


def forward_ad_problem(criterion: nn.Module, num_classes: int, device: torch.device) -> str | None:
    """Why ``criterion`` cannot be differentiated in forward mode (None when it can), probed on tiny logits."""
    z = torch.zeros(2, num_classes, device=device)  # (2, C)
    y = torch.zeros(2, dtype=torch.long, device=device)
    try:
        quiet_jvp(lambda logits: criterion(logits, y), (z,), (torch.ones_like(z),))
    except (NotImplementedError, RuntimeError) as err:
        return f"{type(criterion).__name__} has no forward-mode AD formula ({err})"
    return None
