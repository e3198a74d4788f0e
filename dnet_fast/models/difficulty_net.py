"""The accuracy → difficulty MLP (Difficulty-Net, SPEC §1) and the Meta-Weight-Net baseline's loss → weight MLP."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DifficultyNet", "MetaWeightNet"]


class DifficultyNet(nn.Module):
    """D(A; θ): Linear(N→H) → ReLU → Linear(H→H) → ReLU → Linear(H→N) → sigmoid, on rows of width N.

    PyTorch's default Linear init; no dropout or normalisation, so train/eval mode is irrelevant. Parameter counts
    (SPEC §1): C=100, H=128, no bias → 41,984; C=1000, H=1024, bias → 3,099,624; C=365, H=512, bias → 637,293.

    The paper's Table 4 ablations are the same net with another width N (``dnet_fast.meta.ablations``): N = 1,
    one row per class, is the absolute D^abs(a_c) (#7); N = B, one row of batch losses, is D^sample (#8).

    Args:
        num_classes: the row width N: C for the relative net of Eq. 1 (input and output width).
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
        """Maps R·N raw inputs ((N,), (1, N) or (R·N,)) to difficulties d ∈ (0, 1) of shape (R·N,).

        The relative net (N = C) reads the accuracy vector as one row, as the reference does; a width-1 net
        reads each of the C accuracies as its own row.
        """
        x = acc.reshape(-1, self.num_classes)  # (R, N)
        x = torch.relu(self.fc1(x))  # (R, H)
        x = torch.relu(self.fc2(x))  # (R, H)
        return torch.sigmoid(self.fc3(x)).reshape(-1)  # (R·N,)


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
