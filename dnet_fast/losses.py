"""The LOSSES registry: per-sample training losses returning one value per sample, shape (B,)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from dnet_fast.config import LossConfig
from dnet_fast.registry import Registry

__all__ = [
    "LOSSES",
    "BalancedSoftmax",
    "CDBCrossEntropy",
    "ClassBalancedCE",
    "ClassWeightedLoss",
    "CrossEntropy",
    "EQLSoftmax",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedCE",
    "PerSampleLoss",
    "build_loss",
]

LOSSES: Registry[type[PerSampleLoss]] = Registry("loss")

# Added to suppressed EQL logits. Finite (so 0 · offset is 0, never NaN) yet far below any real logit; the
# loss is computed in at least float32, where exp(-1e30 - max) underflows to exactly 0.
_SUPPRESS_OFFSET = 1e30
# CDB-loss's ε in the dynamic τ bias b = max(a) / (min(a) + ε) - 1 (official CDB-loss code).
_CDB_EPS = 0.01


# ---------------------------------------------------------------------------------------------------------------
# Base classes
# ---------------------------------------------------------------------------------------------------------------


class PerSampleLoss(nn.Module):
    """A training loss that returns one value per sample; the step reduces it (``meta.phases.weighted_mean``
    with `denominator`).

    Subclasses implement `_per_sample` on logits already upcast to at least float32 and shape-checked. State that
    changes during training (DRW, CDB-CE weights) lives in buffers registered with `register_buffer` and is changed
    only in place by `start_epoch`, so a CUDA graph that captured `forward` keeps reading the current values.

    Attributes:
        divides_by_weight_sum: how the loss's *own* class weights v (CB, LDAM-DRW, CDB-CE) are meant to be
            reduced (SPEC §12). False: divide by the batch size B, L = (1/B) Σ_i ℓ_i — the Difficulty-Net
            convention. True: divide by Σ_i v_{y_i}, the form PyTorch's weighted ``cross_entropy`` with mean
            reduction computes and the reference code of that baseline uses. Losses without class weights say
            False (Σ_i 1 = B, so both forms agree).
        num_classes: C when the loss holds per-class buffers (logits must then have C columns), else None.
    """

    divides_by_weight_sum: bool = False
    num_classes: int | None = None

    @classmethod
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> PerSampleLoss:
        """Builds the loss from its config section and the (C,) float64 training counts."""
        raise NotImplementedError

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss.

        Args:
            logits: (B, C) raw class scores.
            target: (B,) int64 labels.

        Returns:
            (B,) loss of each sample, in the promoted dtype of logits and float32.

        Raises:
            ValueError: the shapes or dtypes of ``logits`` and ``target`` do not fit together.
        """
        _check_inputs(logits, target, self.num_classes)
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, C), fp16/bf16 upcast
        return self._per_sample(z, target)

    def _per_sample(self, z: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def start_epoch(self, epoch: int, class_acc: Tensor | None) -> None:
        """Updates epoch-dependent buffers in place; called before each epoch (also after a resume).

        Args:
            epoch: 0-based epoch about to start.
            class_acc: (C,) per-class validation accuracy in [0, 1] measured before this epoch, or None when
                none is available. Losses that do not use it ignore it.
        """

    def sample_weight(self, target: Tensor) -> Tensor:
        """(B,) own class weight v_{y_i} of each sample already multiplied into `forward` (1 if unweighted)."""
        return torch.ones(target.shape, dtype=torch.float32, device=target.device)

    def denominator(self, target: Tensor) -> Tensor | None:
        """Z of the reduction L = Σ_i ω_i ℓ_i / Z for a batch with labels ``target`` (B,).

        None (Z = B, the Difficulty-Net convention) unless `divides_by_weight_sum`; then Z = Σ_i v_{y_i}, floored
        at the smallest float32 so that a batch whose classes all have weight 0 gives 0, not NaN. Z depends on the
        labels only, so it is a constant for every derivative of the meta step.
        """
        if not self.divides_by_weight_sum:
            return None
        return self.sample_weight(target).sum().clamp_min(torch.finfo(torch.float32).tiny)


class ClassWeightedLoss(PerSampleLoss):
    """A loss ℓ_i = v_{y_i} · base_i with a (C,) class-weight buffer ``class_weight`` (starts at 1).

    base_i is the cross-entropy unless a subclass overrides ``_unweighted`` (LDAM does). Reduced like PyTorch's
    weighted ``cross_entropy`` (divide by Σ_i v_{y_i}), as the baselines' reference code does; see
    `PerSampleLoss.divides_by_weight_sum`.
    """

    divides_by_weight_sum = True

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("class_weight", torch.ones(num_classes))

    @override
    def _per_sample(self, z: Tensor, target: Tensor) -> Tensor:
        return self.class_weight[target] * self._unweighted(z, target)  # (B,)

    def _unweighted(self, z: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(z, target, reduction="none")  # (B,)

    @override
    def sample_weight(self, target: Tensor) -> Tensor:
        return self.class_weight[target]  # (B,)


# ---------------------------------------------------------------------------------------------------------------
# Registered losses
# ---------------------------------------------------------------------------------------------------------------


@LOSSES.register("ce")
class CrossEntropy(PerSampleLoss):
    """Cross-entropy ℓ = −log p_y."""

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> CrossEntropy:
        return cls()

    @override
    def _per_sample(self, z: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(z, target, reduction="none")  # (B,)


@LOSSES.register("focal")
class FocalLoss(PerSampleLoss):
    """Softmax focal loss ℓ = −(1 − p_y)^γ log p_y (Lin et al.; γ = 1 as in LDAM-DRW and the CIFAR code).

    Args:
        gamma: focusing exponent γ ≥ 0 (0 gives cross-entropy).
    """

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = float(gamma)

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> FocalLoss:
        return cls(cfg.focal_gamma)

    @override
    def _per_sample(self, z: Tensor, target: Tensor) -> Tensor:
        log_p = F.log_softmax(z, dim=1).gather(1, target[:, None]).squeeze(1)  # (B,)
        # 1 - p_y via expm1 keeps precision when p_y ≈ 1; the tiny floor keeps (·)^γ differentiable for γ < 1.
        one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(z.dtype).tiny)  # (B,)
        return -one_minus_p.pow(self.gamma) * log_p


@LOSSES.register("cb")
class ClassBalancedCE(ClassWeightedLoss):
    """Class-balanced CE (Cui et al.): v_c ∝ (1 − β)/(1 − β^{n_c}) from counts n_c, normalised to sum C.

    The weights come from training *counts*, not frequency ratios (SPEC §13 #18).

    Args:
        class_counts: (C,) training counts.
        beta: β in [0, 1).
    """

    def __init__(self, class_counts: Tensor, beta: float = 0.9999) -> None:
        super().__init__(len(class_counts))
        self.class_weight.copy_(_class_balanced_weights(class_counts, beta))

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> ClassBalancedCE:
        return cls(class_counts, cfg.cb_beta)


@LOSSES.register("ldam")
class LDAMLoss(ClassWeightedLoss):
    """LDAM (Cao et al.): ℓ = CE(s·(z − Δ_y e_y), y), Δ_c ∝ n_c^(−1/4) with max Δ = ``max_margin``.

    With deferred re-weighting (DRW), `start_epoch` switches ``class_weight`` from 1 to the class-balanced weights
    (β = ``drw_beta``) from ``drw_epoch`` on. The reference code applies s to a cosine (normalised) head's outputs;
    here s multiplies whatever logits the model returns.

    Args:
        class_counts: (C,) training counts.
        max_margin: largest margin Δ (of the rarest class).
        scale: logit scale s.
        drw_epoch: first epoch with DRW weights, -1 for never.
        drw_beta: β of the DRW class-balanced weights.
    """

    def __init__(
        self,
        class_counts: Tensor,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_epoch: int = -1,
        drw_beta: float = 0.9999,
    ) -> None:
        super().__init__(len(class_counts))
        self.scale = float(scale)
        self.drw_epoch = int(drw_epoch)
        margins = class_counts.to(torch.float64).pow(-0.25)  # (C,)
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("drw_weight", _class_balanced_weights(class_counts, drw_beta).float())

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> LDAMLoss:
        return cls(class_counts, cfg.ldam_max_margin, cfg.ldam_scale, cfg.drw_epoch, cfg.cb_beta)

    @override
    def start_epoch(self, epoch: int, class_acc: Tensor | None) -> None:
        if 0 <= self.drw_epoch <= epoch:
            self.class_weight.copy_(self.drw_weight)
        else:
            self.class_weight.fill_(1.0)

    @override
    def _unweighted(self, z: Tensor, target: Tensor) -> Tensor:
        margin = self.margins[target].to(z.dtype)  # (B,)
        z_m = z - margin[:, None] * _one_hot(target, z)  # (B, C), only z_y moves
        return F.cross_entropy(self.scale * z_m, target, reduction="none")  # (B,)


@LOSSES.register("eql")
class EQLSoftmax(PerSampleLoss):
    """Softmax equalization loss (Tan et al., image-classification variant).

    For sample i and each non-ground-truth class j with π_j < λ (a tail class), z_j is removed from the softmax
    denominator with probability γ. The Bernoulli draws are one per (sample, class) pair, shape (B, C), as in the
    official CIFAR code's ``beta_func``; they come from ``torch.rand`` on the logits' device (torch's global
    generator there), so results are reproducible under ``torch.manual_seed`` and stay CUDA-graph capturable.
    Removal adds a large finite negative offset to z_j before a stable log-softmax.

    Args:
        class_counts: (C,) training counts (π = n / Σ n).
        lam: frequency threshold λ on π_j.
        gamma: probability γ that a tail logit is suppressed.
    """

    def __init__(self, class_counts: Tensor, lam: float = 0.005, gamma: float = 0.9) -> None:
        super().__init__()
        self.num_classes = len(class_counts)
        self.gamma = float(gamma)
        prior = class_counts / class_counts.sum()  # (C,)
        self.register_buffer("tail", (prior < lam).float())

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> EQLSoftmax:
        return cls(class_counts, cfg.eql_lambda, cfg.eql_gamma)

    @override
    def _per_sample(self, z: Tensor, target: Tensor) -> Tensor:
        draw = (torch.rand(z.shape, device=z.device) < self.gamma).to(z.dtype)  # (B, C) Bernoulli(γ)
        # (B, C): the ground-truth logit is never removed
        negative = 1.0 - _one_hot(target, z)
        suppress = draw * negative * self.tail.to(z.dtype)  # (B, C) in {0, 1}
        return F.cross_entropy(z - _SUPPRESS_OFFSET * suppress, target, reduction="none")  # (B,)


@LOSSES.register("cdb_ce")
class CDBCrossEntropy(ClassWeightedLoss):
    """Class-wise difficulty-balanced CE (Sinha et al.): v_c ∝ (1 − a_c)^τ, normalised to sum C.

    a = the validation accuracies passed to `start_epoch`; v = 1 until the first one arrives. A negative ``tau``
    selects the CDB-loss paper's dynamic τ = 2·sigmoid(b), b = max_c a_c / (min_c a_c + 0.01) − 1, computed on the
    raw accuracies (SPEC §13 #19). If every class has accuracy 1 the weights fall back to 1.

    Args:
        num_classes: C.
        tau: exponent τ ≥ 0, or negative for dynamic τ.
    """

    def __init__(self, num_classes: int, tau: float = 1.0) -> None:
        super().__init__(num_classes)
        self.tau = float(tau)

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> CDBCrossEntropy:
        return cls(len(class_counts), cfg.cdb_tau)

    @override
    def start_epoch(self, epoch: int, class_acc: Tensor | None) -> None:
        if class_acc is None:
            return  # no new measurement: keep the current weights
        if class_acc.shape != self.class_weight.shape:
            msg = f"class_acc must have shape ({self.num_classes},), got {tuple(class_acc.shape)}"
            raise ValueError(msg)
        acc = class_acc.detach().to(self.class_weight.device, torch.float64).clamp(0.0, 1.0)  # (C,)
        self.class_weight.copy_(_cdb_weights(acc, self.tau))


@LOSSES.register("logit_adjust")
class LogitAdjustedCE(PerSampleLoss):
    """Logit-adjusted CE (Menon et al.): ℓ = CE(z + τ log π, y); τ = 1 is Balanced Softmax.

    τ log π is added to the logits before a stable log-softmax, never as log(exp(z)·π) (SPEC §13 #3).

    Args:
        class_counts: (C,) training counts (π = n / Σ n).
        tau: τ.
    """

    def __init__(self, class_counts: Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.num_classes = len(class_counts)
        log_prior = torch.log(class_counts / class_counts.sum())  # (C,) float64
        self.register_buffer("logit_offset", (tau * log_prior).float())

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> LogitAdjustedCE:
        return cls(class_counts, cfg.la_tau)

    @override
    def _per_sample(self, z: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(z + self.logit_offset.to(z.dtype), target, reduction="none")  # (B,)


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(LogitAdjustedCE):
    """Balanced Softmax (Ren et al.): ℓ = CE(z + log π, y).

    Args:
        class_counts: (C,) training counts (π = n / Σ n).
    """

    def __init__(self, class_counts: Tensor) -> None:
        super().__init__(class_counts, tau=1.0)

    @classmethod
    @override
    def from_config(cls, cfg: LossConfig, class_counts: Tensor) -> BalancedSoftmax:
        return cls(class_counts)


# ---------------------------------------------------------------------------------------------------------------
# Building and reducing
# ---------------------------------------------------------------------------------------------------------------


def build_loss(cfg: LossConfig, class_counts: np.ndarray | Tensor, num_epochs: int) -> PerSampleLoss:
    """Builds the registered loss ``cfg.name`` on the CPU (move it with ``.to(device)``).

    Args:
        cfg: the loss config section.
        class_counts: (C,) training count of each class, all > 0.
        num_epochs: length of training, used to reject a DRW epoch that would never be reached.

    Returns:
        The loss module; call its `start_epoch` before every epoch.

    Raises:
        UnknownNameError: ``cfg.name`` is not registered (the message lists the valid names).
        ValueError: bad counts, or ``drw_epoch`` set for a loss without DRW or not below ``num_epochs``.
    """
    loss_cls = LOSSES.get(cfg.name)
    counts = _as_counts(class_counts)
    if cfg.drw_epoch >= 0 and loss_cls is not LDAMLoss:
        msg = f"loss.drw_epoch={cfg.drw_epoch} is only used by 'ldam', not '{cfg.name}'; set it to -1"
        raise ValueError(msg)
    if cfg.drw_epoch >= num_epochs:
        msg = f"loss.drw_epoch={cfg.drw_epoch} would never be reached in {num_epochs} epochs"
        raise ValueError(msg)
    return loss_cls.from_config(cfg, counts)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(logits: Tensor, target: Tensor, num_classes: int | None) -> None:
    """Raises ValueError unless logits is (B, C), target is int64 (B,), and C matches the loss's classes."""
    if logits.dim() != 2:
        msg = f"logits must be (B, C), got shape {tuple(logits.shape)}"
        raise ValueError(msg)
    if target.shape != logits.shape[:1]:
        msg = f"target must be ({logits.shape[0]},) to match logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        raise ValueError(msg)
    if target.dtype != torch.int64:
        msg = f"target must be int64, got {target.dtype}"
        raise ValueError(msg)
    if num_classes is not None and logits.shape[1] != num_classes:
        msg = f"logits have {logits.shape[1]} classes, the loss was built for {num_classes}"
        raise ValueError(msg)


def _one_hot(target: Tensor, like: Tensor) -> Tensor:
    """(B, C) one-hot rows of ``target`` in the dtype of ``like``; a scatter, so no host-side label check."""
    return torch.zeros_like(like).scatter_(1, target[:, None], 1.0)


def _as_counts(class_counts: np.ndarray | Tensor) -> Tensor:
    """(C,) float64 CPU tensor of positive training counts."""
    counts = torch.as_tensor(class_counts).detach().to("cpu", torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        msg = f"class_counts must be a non-empty (C,) vector, got shape {tuple(counts.shape)}"
        raise ValueError(msg)
    if bool((counts <= 0).any()):
        msg = f"class_counts must all be > 0 (training counts, not empty classes), got min {counts.min():g}"
        raise ValueError(msg)
    return counts


def _class_balanced_weights(class_counts: Tensor, beta: float) -> Tensor:
    """(C,) effective-number weights (1 − β)/(1 − β^{n_c}) normalised to sum C, from counts n_c ≥ 1."""
    counts = class_counts.to(torch.float64)
    # -expm1(n·log β) = 1 - β^n without cancellation for β close to 1; β = 0 gives uniform weights
    effective = -torch.expm1(counts * math.log(beta)) if beta > 0 else torch.ones_like(counts)
    weights = (1.0 - beta) / effective  # (C,)
    return weights * (len(counts) / weights.sum())


def _cdb_weights(acc: Tensor, tau: float) -> Tensor:
    """(C,) CDB weights (1 − a_c)^τ normalised to sum C, with τ dynamic when negative; uniform if all are 0."""
    if tau < 0:
        bias = acc.max() / (acc.min() + _CDB_EPS) - 1.0  # 0-dim, raw accuracies (SPEC §13 #19)
        tau_t = 2.0 * torch.sigmoid(bias)
    else:
        tau_t = torch.tensor(tau, dtype=acc.dtype, device=acc.device)
    difficulty = (1.0 - acc).pow(tau_t)  # (C,)
    total = difficulty.sum()
    weights = difficulty * (len(acc) / total.clamp_min(torch.finfo(acc.dtype).tiny))
    return torch.where(total > 0, weights, torch.ones_like(weights))
