"""Forward-mode helpers of the jvp meta-gradient: train-mode BatchNorm with a closed-form JVP, and a quiet jvp."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "BatchNormTrain",
    "ClosedFormBatchNorm",
    "batch_norm_train",
    "batch_norm_train_jvp",
    "quiet_jvp",
]

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """(C,) → (1, C, 1, …) for broadcasting over an (N, C, *) tensor of ``ndim`` dimensions."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def batch_norm_train_jvp(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    x_t: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
) -> Tensor:
    """Tangent of train-mode BatchNorm y = γ·x̂ + β, x̂ = (x − μ)·invstd with batch statistics μ, invstd.

    y_t = γ·invstd·(t − mean(t) − x̂·mean(t·x̂)) + γ_t·x̂ + β_t, means over every dimension but 1. Written as
    y_t = a·t + b·x + c with per-channel a, b, c: one reduction pass over (t, x) and two fused elementwise passes,
    instead of the dozen full-size ops of torch's generic formula.

    Args:
        x: (N, C, *) input.
        mean: (C,) batch mean μ of ``x``.
        invstd: (C,) 1/sqrt(var + eps) with the biased batch variance.
        weight: (C,) γ, or None for 1.
        x_t: tangent of ``x`` (N, C, *) or None for zero.
        weight_t: (C,) tangent of γ or None.
        bias_t: (C,) tangent of β or None.

    Returns:
        y_t (N, C, *) in ``x``'s dtype.
    """
    a = invstd if weight is None else weight * invstd  # (C,) γ·invstd
    b = torch.zeros_like(invstd) if weight_t is None else weight_t * invstd  # (C,) coefficient of x
    c = -b * mean  # (C,) constant: γ_t·x̂ = b·x + c
    if bias_t is not None:
        c = c + bias_t
    if x_t is None:
        return torch.addcmul(_per_channel(c, x.ndim), x, _per_channel(b, x.ndim)).to(x.dtype)
    # Σ t·x̂ and Σ t per channel in one fused pass: BN's own backward reduction with t as the output gradient
    # (its grad_weight and grad_bias; eps is read only in eval mode).
    _, dot_t_xhat, sum_t = torch.ops.aten.native_batch_norm_backward(
        x_t, x, weight, None, None, mean, invstd, True, 0.0, [False, True, True]
    )
    n = x.numel() // x.shape[1]
    mean_t, mean_t_xhat = sum_t / n, dot_t_xhat / n  # (C,)
    b = b - a * invstd * mean_t_xhat  # −γ·invstd·x̂·mean(t·x̂) = −a·invstd·mean(t·x̂)·(x − μ)
    c = c - a * mean_t + a * invstd * mean_t_xhat * mean
    y_t = torch.addcmul(_per_channel(c, x.ndim), x_t, _per_channel(a, x.ndim))
    return y_t.addcmul_(x, _per_channel(b, x.ndim)).to(x.dtype)


class BatchNormTrain(torch.autograd.Function):
    """Train-mode BatchNorm without running statistics, with `batch_norm_train_jvp` as its forward-mode rule.

    ``apply(x, weight, bias, eps) -> (y, mean, invstd)``; ``mean`` and ``invstd`` (C,) are non-differentiable.
    Usable under ``torch.func.jvp`` (new-style ``setup_context``) and in reverse mode.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, ...]:
        """(y (N, C, *), mean (C,), invstd (C,)) from the batch statistics."""
        return tuple(torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        """Saves x, γ and the statistics for both AD modes."""
        x, weight, _bias, eps = inputs
        _, mean, invstd = output
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)

    @staticmethod
    def jvp(
        ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _eps: None
    ) -> tuple:
        """(y_t, None, None): `batch_norm_train_jvp`; the statistics are non-differentiable outputs."""
        x, weight, mean, invstd = ctx.saved_tensors
        return batch_norm_train_jvp(x, mean, invstd, weight, x_t, weight_t, bias_t), None, None

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _grad_mean: None, _grad_invstd: None) -> tuple:
        """(∂/∂x, ∂/∂γ, ∂/∂β, None) by torch's fused BatchNorm backward."""
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return (*grads, None)


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """y (N, C, *) of train-mode BatchNorm (batch statistics, running statistics untouched)."""
    return BatchNormTrain.apply(x, weight, bias, eps)[0]


class ClosedFormBatchNorm(TorchFunctionMode):
    """Routes train-mode ``F.batch_norm`` to `batch_norm_train` while active (eval-mode calls pass through).

    For forward-mode passes whose BatchNorm running statistics are thrown away anyway (the jvp of
    ``meta.loss_jvp`` runs on scratch buffers): the running-statistics update is skipped and the tangent uses the
    closed form. On a CPU ResNet-32 step this cut the jvp pass by about a quarter.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,  # noqa: ARG002  (protocol argument)
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Intercepts ``F.batch_norm(..., training=True)``; every other call runs unchanged."""
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["training"]:
                return batch_norm_train(a["input"], a["weight"], a["bias"], a["eps"])
        return func(*args, **kwargs)


def quiet_jvp(
    fn: Callable[..., Tensor], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Tensor, Tensor]:
    """``torch.func.jvp``, minus the DeprecationWarning torch's own first call raises.

    The first jvp imports torch's forward-AD decompositions, which torch compiles with the deprecated
    ``torch.jit.script``; the warning concerns torch internals, not this code.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning
        )
        return torch.func.jvp(fn, primals, tangents)
