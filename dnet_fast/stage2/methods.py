"""The STAGE2_METHODS registry (cRT, LWS, τ-norm, LAS), the stage-2 head and the label-aware smoothing loss.

SPEC §7. Every method keeps the stage-1 backbone frozen and decides three things: the head it starts from (the
stage-1 classifier, or a fresh one for cRT), which head parameters train at which learning-rate multiple, and the
loss. τ-norm trains nothing; its τ is chosen on the val split by ``dnet_fast.stage2.train``.

The head of a stage-2 model is a :class:`Stage2Head`: logits = s ⊙ z(f), with z the classifier's logits (or their
τ-normalised form) and s the (C,) LWS scale, ones unless the method trains it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnet_fast.config import LossConfig, Stage2Config, TrainConfig
from dnet_fast.losses import build_loss
from dnet_fast.models import build_head, build_model
from dnet_fast.registry import Registry

__all__ = [
    "STAGE2_METHODS",
    "TAU_NORMS",
    "LabelAwareSmoothing",
    "Stage2Head",
    "Stage2Method",
    "TrainedGroup",
    "las_epsilons",
    "las_eps_for_ratio",
    "stage2_model",
    "tau_grid",
    "tau_norm_weight",
]

#: name -> Stage2Method subclass (``stage2.method``).
STAGE2_METHODS: Registry[type[Stage2Method]] = Registry("stage-2 method")

#: head kind (``model.head``) -> ``fn(head, features (B, F), tau) -> logits (B, C)`` with W_c / ‖W_c‖^τ.
TAU_NORMS: Registry[Callable[[nn.Module, Tensor, float], Tensor]] = Registry("τ-norm head")

# The official CIFAR rule for LAS (cifar_train_exaugment_stage2.py): ρ above each bound -> (ε_head, ε_tail).
_LAS_RATIO_RULE = ((100.0, (0.4, 0.0)), (50.0, (0.4, 0.1)), (20.0, (0.3, 0.0)))
_LAS_LOW_RATIO = (0.2, 0.0)
_NORM_FLOOR = 1e-12  # an all-zero class row keeps a finite τ-normalised weight


# ----------------------------------------------------------------------------------------------------------
# τ-norm


def tau_norm_weight(weight: Tensor, tau: float) -> Tensor:
    """W_c / ‖W_c‖^τ for every class row of a (C, F) weight (τ = 0 returns W exactly)."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(_NORM_FLOOR).pow(tau)  # (C, F)


@TAU_NORMS.register("linear")
def _tau_linear(head: nn.Module, f: Tensor, tau: float) -> Tensor:
    """Linear head: f·(W_c/‖W_c‖^τ) + b_c (the bias is kept, so τ = 0 is the trained head)."""
    return F.linear(f, tau_norm_weight(head.weight, tau), head.bias)  # (B, C)


@TAU_NORMS.register("cosine")
def _tau_cosine(head: nn.Module, f: Tensor, tau: float) -> Tensor:
    """Cosine head: s·⟨f/‖f‖, W_c/‖W_c‖^τ⟩.

    The cosine classifier normalises W_c itself, so rescaling its stored weight changes nothing; τ-norm acts on the
    raw rows instead. τ = 1 is the trained cosine head, τ = 0 the unnormalised dot product with the unit feature.
    """
    return head.scale * F.linear(F.normalize(f, dim=1), tau_norm_weight(head.weight, tau))  # (B, C)


def tau_grid(s: Stage2Config) -> list[float]:
    """The τ values swept on val: ``tau_points`` evenly spaced in [tau_min, tau_max] (41 in [0, 2] by default)."""
    return [float(t) for t in np.linspace(s.tau_min, s.tau_max, s.tau_points)]


# ----------------------------------------------------------------------------------------------------------
# The stage-2 head


class Stage2Head(nn.Module):
    """logits = s ⊙ z(f): the classifier's logits z (or their τ-normalised form) times the per-class scale s.

    Args:
        head: the classifier (``nn.Linear`` or ``CosineClassifier``, weight (C, F)).
        kind: its ``model.head`` name, which selects the τ-norm form (``TAU_NORMS``).
        tau: apply τ-norm with this τ; None: the classifier's own forward.

    Attributes:
        scale: (C,) LWS scale, initialised to ones; frozen unless the method trains it.
    """

    def __init__(self, head: nn.Module, kind: str, tau: float | None = None) -> None:
        super().__init__()
        self.head = head
        self.kind = kind
        self.tau = tau
        self.scale = nn.Parameter(torch.ones(head.weight.shape[0], device=head.weight.device), requires_grad=False)

    def forward(self, f: Tensor) -> Tensor:
        """Maps features (B, F) to logits (B, C)."""
        z = self.head(f) if self.tau is None else TAU_NORMS.get(self.kind)(self.head, f, self.tau)  # (B, C)
        return z * self.scale

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tau={self.tau}"


def stage2_model(cfg: TrainConfig, num_classes: int, tau: float | None = None) -> nn.Module:
    """The architecture of a stage-2 checkpoint: the stage-1 model with ``fc`` wrapped in a :class:`Stage2Head`.

    Built without loading ``model.pretrained`` (the weights come from the checkpoint); ``tau`` as saved with it.
    """
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), num_classes)
    model.fc = Stage2Head(model.fc, cfg.model.head, tau)
    return model


# ----------------------------------------------------------------------------------------------------------
# Label-aware smoothing (MiSLAS, Zhong et al. CVPR 2021)


def las_epsilons(class_counts: np.ndarray, eps_head: float, eps_tail: float) -> np.ndarray:
    """ε_y = ε_K + (ε_1 − ε_K)·sin(π(n_y − n_K) / (2(n_1 − n_K))), the concave MiSLAS profile, float64 (C,).

    n_1 / n_K are the largest / smallest count. With all counts equal every class is the head (ε_head); MiSLAS
    divides by zero there.
    """
    n = np.asarray(class_counts, dtype=np.float64)
    n1, nk = n.max(), n.min()
    if n1 == nk:
        return np.full(n.shape, float(eps_head))
    return eps_tail + (eps_head - eps_tail) * np.sin(np.pi * (n - nk) / (2 * (n1 - nk)))


def las_eps_for_ratio(ratio: float) -> tuple[float, float]:
    """(ε_head, ε_tail) of the official CIFAR rule: ρ > 100 → (0.4, 0), > 50 → (0.4, 0.1), > 20 → (0.3, 0), else
    (0.2, 0)."""
    for bound, eps in _LAS_RATIO_RULE:
        if ratio > bound:
            return eps
    return _LAS_LOW_RATIO


class LabelAwareSmoothing(nn.Module):
    """ℓ_i = (1 − ε_y)(−log p_y) + ε_y · mean_c(−log p_c), per sample.

    Args:
        class_counts: (C,) training counts n_c.
        eps_head: ε_1 of the most frequent class.
        eps_tail: ε_K of the least frequent class.
    """

    def __init__(self, class_counts: np.ndarray, eps_head: float, eps_tail: float) -> None:
        super().__init__()
        eps = torch.as_tensor(las_epsilons(class_counts, eps_head, eps_tail), dtype=torch.float64)
        self.register_buffer("eps", eps)  # (C,)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss (B,) of logits (B, C) and labels (B,), in at least float32."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logp = F.log_softmax(logits, dim=1)  # (B, C)
        nll = -logp.gather(1, target[:, None]).squeeze(1)  # (B,)
        eps = self.eps[target].to(logp.dtype)  # (B,)
        return (1 - eps) * nll + eps * (-logp.mean(dim=1))


# ----------------------------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass(frozen=True)
class TrainedGroup:
    """Parameters a method trains, at ``lr · lr_mult``."""

    name: str
    params: list[nn.Parameter]
    lr_mult: float


class Stage2Method:
    """What one stage-2 method starts from, trains and minimises (subclasses register in ``STAGE2_METHODS``).

    Attributes:
        label: the method's name in tables ("cRT").
        trains: False for a post-hoc method (τ-norm).
    """

    label: ClassVar[str] = ""
    trains: ClassVar[bool] = True

    def head(self, stage1_head: nn.Module, cfg: TrainConfig) -> Stage2Head:
        """The stage-2 head, built around the stage-1 classifier (default: kept as trained)."""
        return Stage2Head(stage1_head, cfg.model.head)

    def groups(self, head: Stage2Head, s: Stage2Config) -> list[TrainedGroup]:  # noqa: ARG002
        """What trains; everything else in the head stays frozen."""
        return []

    def criterion(self, s: Stage2Config, class_counts: np.ndarray) -> nn.Module:  # noqa: ARG002
        """The per-sample loss (B,) the trained groups minimise (default: cross-entropy)."""
        return build_loss(LossConfig(name="ce"), class_counts, s.epochs)

    def bn(self, s: Stage2Config) -> str:  # noqa: ARG002
        """BatchNorm during training (``config.STAGE2_BN``): frozen, eval-mode statistics, unless LAS shifts it."""
        return "frozen"

    def describe(self, s: Stage2Config, class_counts: np.ndarray) -> dict[str, Any]:  # noqa: ARG002
        """Method-specific facts recorded in results.json."""
        return {}


@STAGE2_METHODS.register("crt")
class ClassifierRetraining(Stage2Method):
    """cRT (Kang et al. 2020): a freshly initialised classifier (seeded by ``run.seed``), CE, class-balanced."""

    label = "cRT"

    def head(self, stage1_head: nn.Module, cfg: TrainConfig) -> Stage2Head:
        """A new head of the stage-1 kind and shape; the stage-1 weights are discarded."""
        classes, features = stage1_head.weight.shape
        torch.manual_seed(cfg.run.seed)  # the re-initialisation is a pure function of the config
        fresh = build_head(cfg.model.head, features, classes, cfg.model.head_scale)
        return Stage2Head(fresh.to(stage1_head.weight.device), cfg.model.head)

    def groups(self, head: Stage2Head, s: Stage2Config) -> list[TrainedGroup]:  # noqa: ARG002
        return [TrainedGroup("classifier", list(head.head.parameters()), 1.0)]


@STAGE2_METHODS.register("lws")
class LearnableWeightScaling(Stage2Method):
    """LWS (Kang et al. 2020): the stage-1 classifier frozen, a per-class scale s_c (init 1) learnt with CE."""

    label = "LWS"

    def groups(self, head: Stage2Head, s: Stage2Config) -> list[TrainedGroup]:  # noqa: ARG002
        return [TrainedGroup("scale", [head.scale], 1.0)]


@STAGE2_METHODS.register("tau_norm")
class TauNormalisation(Stage2Method):
    """τ-norm (Kang et al. 2020): W_c ← W_c / ‖W_c‖^τ, no training; τ chosen on val (see ``TAU_NORMS``)."""

    label = "τ-norm"
    trains = False


@STAGE2_METHODS.register("las")
class LabelAwareSmoothingMethod(Stage2Method):
    """LAS (MiSLAS): the stage-1 classifier at lr · ``las_classifier_lr_mult`` plus the LWS scale at lr, the
    label-aware smoothing loss, BatchNorm per ``las_bn`` (shift BN where the recipe says so)."""

    label = "LAS"

    def groups(self, head: Stage2Head, s: Stage2Config) -> list[TrainedGroup]:
        return [TrainedGroup("classifier", list(head.head.parameters()), s.las_classifier_lr_mult),
                TrainedGroup("scale", [head.scale], 1.0)]

    def criterion(self, s: Stage2Config, class_counts: np.ndarray) -> nn.Module:
        return LabelAwareSmoothing(class_counts, *self.epsilons(s, class_counts))

    def bn(self, s: Stage2Config) -> str:
        return s.las_bn

    @staticmethod
    def epsilons(s: Stage2Config, class_counts: np.ndarray) -> tuple[float, float]:
        """(ε_head, ε_tail): from the config, or from the counts' imbalance ratio with ``las_eps_by_ratio``."""
        if not s.las_eps_by_ratio:
            return s.las_eps_head, s.las_eps_tail
        counts = np.asarray(class_counts)
        return las_eps_for_ratio(float(counts.max()) / max(float(counts.min()), 1.0))

    def describe(self, s: Stage2Config, class_counts: np.ndarray) -> dict[str, Any]:
        head, tail = self.epsilons(s, class_counts)
        return {"las_eps_head": head, "las_eps_tail": tail, "las_bn": s.las_bn,
                "classifier_lr_mult": s.las_classifier_lr_mult}
