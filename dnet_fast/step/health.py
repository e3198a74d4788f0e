"""The step's finite-value guard: a device flag recording the first iteration whose numbers went non-finite.

Updated inside the (possibly captured) step with tensor ops only — no host sync per iteration; the engine reads
it at its logging points and before every checkpoint (`first_bad`), so a diverged run stops at the next one and
never checkpoints or reports a non-finite state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["FiniteGuard"]


class FiniteGuard:
    """Watches the step's scalar outputs (losses, weight statistics) and every trained parameter.

    A non-finite gradient makes the parameters it updates non-finite, and Difficulty-Net's weights enter the
    outputs (``weight_min``/``weight_max``), so loss, gradient, parameter and weight failures all show here.

    Args:
        params: the tensors that must stay finite (the classifier's and the auxiliary net's parameters).
        device: where the flag lives.

    Attributes:
        iteration: 0-d int64, iterations watched since construction (or the last `reset`).
        first_bad: 0-d int64, the first watched iteration that was not finite, or −1.
    """

    def __init__(self, params: Iterable[Tensor], device: torch.device) -> None:
        self.params = [p for p in params if p.is_floating_point()]
        self.iteration = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    @property
    def tensors(self) -> list[Tensor]:
        """The guard's state (restored with the rest of the step's state around a capture warm-up)."""
        return [self.iteration, self.first_bad]

    @torch.no_grad()
    def update(self, scalars: Iterable[Tensor]) -> None:
        """Records this iteration: finite iff every scalar and every parameter is (one fused norm per dtype)."""
        values = [s.detach().float().reshape(1) for s in scalars]
        values += [n.float().reshape(1) for n in torch._foreach_norm(self.params)] if self.params else []
        ok = torch.cat(values).isfinite().all()
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~ok, self.iteration, self.first_bad))
        self.iteration.add_(1)

    def first_bad_iteration(self) -> int | None:
        """The first non-finite iteration (0-based, counted since construction), or None. A host sync."""
        value = int(self.first_bad)  # sync point: read at logging points and before checkpoints only
        return None if value < 0 else value
