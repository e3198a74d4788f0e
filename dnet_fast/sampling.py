"""Sample orders for training epochs and class-balanced meta batches, pure functions of (seed, epoch, rank, step)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import numpy as np

__all__ = ["EPOCH_KINDS", "MetaBatchSampler", "epoch_order"]

EPOCH_KINDS = ("uniform", "class_aware", "sqrt", "progressive")


def _load_extension() -> ModuleType:
    """Import ``dnet_fast._C``, or the build named by ``DNET_FAST_C_PATH`` (used by tools/sanitize_tests.sh).

    This is the one place the extension is loaded; ``metrics`` takes ``_C`` from here.
    """
    path = os.environ.get("DNET_FAST_C_PATH")
    if not path:
        return importlib.import_module("dnet_fast._C")
    spec = importlib.util.spec_from_file_location("dnet_fast._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"DNET_FAST_C_PATH={path!r} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dnet_fast._C"] = module
    spec.loader.exec_module(module)
    return module


_C = _load_extension()


def epoch_order(
    labels: np.ndarray,
    kind: str = "uniform",
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    num_epochs: int = 1,
    num_samples: int | None = None,
    per_visit: int = 4,
) -> np.ndarray:
    """This rank's sample indices for one epoch.

    Kinds (P = number of non-empty classes, L = ``num_samples`` or ``len(labels)``):

    - ``uniform``: a permutation of all samples (L must be N).
    - ``class_aware``: the cRT sampler of Kang et al. (official ``ClassAwareSampler``): classes are visited in a
      fresh random order every cycle and each visit takes ``per_visit`` samples of that class.
    - ``sqrt``: class c gets L * sqrt(n_c) / sum sqrt(n) samples (square-root sampling).
    - ``progressive``: class shares move linearly from n_c / N at epoch 0 to 1 / P at epoch ``num_epochs``
      (Kang et al., ICLR 2020), constant afterwards.

    Class shares are apportioned exactly (largest remainder), so an epoch holds the expected count of each class
    rather than a multinomial draw. Within a class, samples are drawn from a fresh permutation each pass and the
    passes continue across epochs, so no sample repeats before its class is exhausted. Epoch orders are identical
    on every rank; as in ``torch.utils.data.DistributedSampler`` the order is padded by wrapping around to a
    multiple of ``world_size`` and rank r takes positions r, r + world_size, ...; every rank gets
    ceil(L / world_size) indices.

    Args:
        labels: (N,) integer class labels in [0, 2**31); empty classes are never drawn.
        kind: one of ``EPOCH_KINDS``.
        seed: 64-bit seed.
        epoch: epoch number (>= 0).
        rank: this process's rank.
        world_size: number of processes.
        num_epochs: length T of the progressive schedule.
        num_samples: global epoch length L (default N); not allowed to differ from N for ``uniform``.
        per_visit: samples per class visit for ``class_aware`` (4 in cRT).

    Returns:
        (ceil(L / world_size),) int64 indices into ``labels``.

    Raises:
        ValueError: on bad labels (dtype, ndim, negative values) or arguments out of range.
    """
    length = -1 if num_samples is None else num_samples
    return _C.epoch_order(labels, kind, seed, epoch, rank, world_size, num_epochs, length, per_visit)


class MetaBatchSampler:
    """Class-balanced meta batches, a pure function of (seed, step).

    Each batch of size m holds floor(m / C) or ceil(m / C) samples of every class (m distinct classes when m < C);
    which classes get the extra samples rotates so that all classes are equally represented over each round of
    C / gcd(m, C) consecutive batches. Within a class the j-th draw is element j mod n_c of a permutation of its
    samples seeded by (seed, c, j // n_c), so no sample repeats before its class is exhausted.

    Args:
        labels: (N,) integer labels of the meta set.
        num_classes: C; defaults to max(labels) + 1. A class with no samples raises ``ValueError`` as soon as a
            batch needs it.
        seed: 64-bit seed.
    """

    def __init__(self, labels: np.ndarray, num_classes: int | None = None, *, seed: int) -> None:
        labels = np.asarray(labels)
        if num_classes is None:
            if labels.size == 0:
                raise ValueError("labels is empty; pass num_classes or a non-empty label array")
            num_classes = int(labels.max()) + 1 if labels.dtype.kind in "iu" else 1
        self._sampler = _C.MetaSampler(labels, num_classes, seed)
        self.num_classes = int(num_classes)
        self.seed = seed

    @property
    def class_sizes(self) -> np.ndarray:
        """(C,) int64 number of samples of each class."""
        return self._sampler.class_sizes()

    def batch(self, step: int, m: int) -> np.ndarray:
        """Indices of meta batch ``step``, shape (m,) int64."""
        return self._sampler.batches(step, 1, m)[0]

    def batches(self, step: int, k: int, m: int) -> np.ndarray:
        """Indices of meta batches ``step .. step + k - 1``, shape (k, m) int64, in one call."""
        return self._sampler.batches(step, k, m)
