"""Typed stub of the compiled engine ``dnet_fast._C`` (checked against the live module by tests/test_stub.py)."""

from typing import SupportsIndex

import numpy as np
from numpy.typing import ArrayLike, NDArray

def counts_from_logits(
    logits: ArrayLike,
    label: ArrayLike,
    num_classes: SupportsIndex,
    topk: SupportsIndex = 1,
    num_threads: SupportsIndex = 0,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]: ...
def random_bounded(key: SupportsIndex, bounds: ArrayLike) -> NDArray[np.uint64]: ...
def permutation(n: SupportsIndex, key: SupportsIndex) -> NDArray[np.int64]: ...
def epoch_order(
    labels: ArrayLike,
    kind: str,
    seed: SupportsIndex,
    epoch: SupportsIndex,
    rank: SupportsIndex,
    world_size: SupportsIndex,
    num_epochs: SupportsIndex,
    num_samples: SupportsIndex,
    per_visit: SupportsIndex,
) -> NDArray[np.int64]: ...

class MetaSampler:
    def __init__(self, labels: ArrayLike, num_classes: SupportsIndex, seed: SupportsIndex) -> None: ...
    def batches(self, step: SupportsIndex, k: SupportsIndex, m: SupportsIndex) -> NDArray[np.int64]: ...
    def class_sizes(self) -> NDArray[np.int64]: ...
