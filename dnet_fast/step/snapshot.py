"""Snapshot and restore of everything a training step mutates in place, read from the meta mode's declaration."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from dnet_fast.meta import MetaMode
from dnet_fast.metrics import DeviceClassCounter

__all__ = ["ZERO_INIT_STATE", "StateSnapshot", "mutable_state", "step_optimizers"]

#: Optimizer-state keys that torch (Adam, AdamW, SGD) and `sgd_step_` initialise to zeros. State created lazily
#: during the capture warm-up is reset to zeros, which equals a fresh state only for these keys.
ZERO_INIT_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})


def step_optimizers(meta: MetaMode) -> list[torch.optim.Optimizer]:
    """The optimisers a step of ``meta`` updates (``meta.owned().optimizers``): the main one first."""
    return list(meta.owned().optimizers.values())


def _optimizer_state(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[tuple[str, Tensor]]:
    for opt in optimizers:
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    yield key, value


def mutable_state(
    meta: MetaMode, counter: DeviceClassCounter | None = None, extra: Iterable[Tensor] = ()
) -> list[Tensor]:
    """Every tensor a step of ``meta`` may change in place (deduplicated, in a stable order).

    From ``meta.owned()``: parameters and buffers of its modules (BN running statistics and
    ``num_batches_tracked`` included), the optimiser states that exist now and its tensors (A); plus the counters
    and the step's ``extra`` state (its finite-value guard).
    """
    owned = meta.owned()
    tensors: list[Tensor] = list(owned.tensors.values())
    for module in owned.modules.values():
        tensors += [*module.parameters(), *module.buffers()]
    tensors += [t for _, t in _optimizer_state(owned.optimizers.values())]
    if counter is not None:
        tensors += [counter.correct, counter.total]
    tensors += list(extra)
    unique: dict[int, Tensor] = {}
    for t in tensors:
        unique.setdefault(id(t), t)  # shared tensors (tied weights, the same optimizer twice) once
    return list(unique.values())


class StateSnapshot:
    """Copies of the step's mutable state and RNG, restorable in place (tensor addresses never change).

    Warm-up iterations before a capture update parameters, BN running statistics, optimiser states and counters
    an extra time; restoring the snapshot after capture makes the first replay start from the eager state.
    Optimiser state that did not exist at snapshot time (torch creates Adam's lazily) is reset to zeros, its
    fresh value (`ZERO_INIT_STATE`).

    Args:
        meta: the meta mode whose state to save.
        counter: device class counters to save as well.
        extra: further step-owned tensors to save (the finite-value guard).
    """

    def __init__(
        self, meta: MetaMode, counter: DeviceClassCounter | None = None, extra: Iterable[Tensor] = ()
    ) -> None:
        self.meta, self.counter = meta, counter
        with torch.no_grad():
            self._saved = [(t, t.detach().clone()) for t in mutable_state(meta, counter, extra)]
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state(meta.device) if meta.device.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        """Copies the saved values back in place and zeros optimiser state created since the snapshot.

        Raises:
            RuntimeError: a new optimiser state is not zero-initialised in torch (cannot be restored).
        """
        for tensor, saved in self._saved:
            tensor.copy_(saved)
        known = {id(t) for t, _ in self._saved}
        for key, value in _optimizer_state(step_optimizers(self.meta)):
            if id(value) in known:
                continue
            if key not in ZERO_INIT_STATE:
                msg = f"optimizer state {key!r} appeared during warm-up and has no known initial value"
                raise RuntimeError(msg)
            value.zero_()
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state(self._cuda_rng, self.meta.device)
