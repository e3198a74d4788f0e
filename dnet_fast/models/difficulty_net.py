"""The accuracy → difficulty MLP (Difficulty-Net, SPEC §1) and the Meta-Weight-Net baseline's loss → weight MLP."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DifficultyNet", "MetaWeightNet"]


class DifficultyNet(nn.Module):
    """D(A; θ): Linear(C→H) → ReLU → Linear(H→H) → ReLU → Linear(H→C) → sigmoid.

    PyTorch's default Linear init; no dropout or normalisation, so train/eval mode is irrelevant. Parameter counts
    (SPEC §1): C=100, H=128, no bias → 41,984; C=1000, H=1024, bias → 3,099,624; C=365, H=512, bias → 637,293.

    Args:
        num_classes: number of classes C (input and output width).
        hidden: hidden width H.
        bias: whether the three Linear layers carry biases (the CIFAR reference has none).
    """

    def __init__(self, num_classes: int, hidden: int = 128, bias: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(num_classes, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, hidden, bias=bias)
        self.fc3 = nn.Linear(hidden, num_classes, bias=bias)

    def forward(self, acc: torch.Tensor) -> torch.Tensor:
        """Maps the raw per-class accuracy vector, (C,) or (1, C), to difficulties d ∈ (0, 1) of shape (C,)."""
        x = acc.reshape(1, self.num_classes)  # (1, C): the reference feeds one row
        x = torch.relu(self.fc1(x))  # (1, H)
        x = torch.relu(self.fc2(x))  # (1, H)
        return torch.sigmoid(self.fc3(x)).reshape(self.num_classes)  # (C,)


class MetaWeightNet(nn.Module):
    """V(ℓ; Θ) of Meta-Weight-Net: Linear(1→H) → ReLU → Linear(H→1) → sigmoid, applied per sample.

    Args:
        hidden: hidden width H (100 in the reference).
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        """Maps per-sample losses (B,) to weights in (0, 1) of shape (B,); not normalised by their sum."""
        x = torch.relu(self.fc1(loss.reshape(-1, 1)))  # (B, H)
        return torch.sigmoid(self.fc2(x)).reshape(-1)  # (B,)
