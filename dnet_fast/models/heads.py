"""The HEADS registry of classifier heads: the plain linear layer and the cosine classifier (SPEC §6.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dnet_fast.registry import Registry

__all__ = ["HEADS", "CosineClassifier", "build_head"]

#: name -> ``fn(in_features, num_classes, scale) -> nn.Module`` (``model.head``).
HEADS: Registry[Callable[[int, int, float], nn.Module]] = Registry("head")


class CosineClassifier(nn.Module):
    """Cosine classifier: logits = s·⟨x/‖x‖, W_c/‖W_c‖⟩, no bias.

    The weight has ``nn.Linear``'s layout (num_classes, in_features), so code that reads ``fc.weight`` row by row
    (τ-norm, cRT re-initialisation) treats both heads alike. It is drawn from U(−1, 1) and each class row is then
    rescaled to unit norm, as the reference code's ``NormedLinear`` does column-wise on its transposed weight.

    Args:
        in_features: feature dimension F.
        num_classes: number of classes C.
        scale: the scale s applied to the cosines.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))  # (C, F)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws W from U(−1, 1) and renormalises every class row to unit L2 norm."""
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            # renorm caps each row's norm at 1e-5; the multiplication brings every row to exactly norm 1.
            self.weight.renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps features (B, F) to scaled cosine logits (B, C)."""
        x = F.normalize(x, dim=1)  # (B, F)
        w = F.normalize(self.weight, dim=1)  # (C, F)
        return self.scale * F.linear(x, w)  # (B, C)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale}"


@HEADS.register("linear")
def _linear(in_features: int, num_classes: int, scale: float) -> nn.Module:  # noqa: ARG001  (no scale)
    return nn.Linear(in_features, num_classes)


HEADS.register("cosine")(CosineClassifier)


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    """Builds a classifier head.

    Args:
        kind: a ``HEADS`` name: ``linear`` (``nn.Linear`` with bias) or ``cosine`` (:class:`CosineClassifier`).
        in_features: feature dimension F.
        num_classes: number of classes C.
        scale: cosine scale s (ignored by the linear head).

    Raises:
        UnknownNameError: unknown ``kind`` (a ValueError listing the valid names).
    """
    return HEADS.get(kind)(in_features, num_classes, scale)
