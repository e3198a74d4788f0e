"""Per-epoch extras of the released Difficulty-Net code: what each tree runs every epoch besides its iterations.

Read from hitachi-rd-cv/Difficulty_Net @ c6d131566dd6fd860226aeeee982acd4d6ac7da0 (``C:n`` =
``CIFAR-LT/cifar_train_exaugment.py``, ``I:n`` = ``ImageNet_Places-LT/train_stage1.py``), for the e2e benchmark's
per-epoch extrapolation of the loops in ``benchmarks/official.py`` (which re-exports these names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["OFFICIAL_SETS", "EpochExtras", "EvalPass", "cifar_official_train_size", "epoch_extras"]

_TREES = ("cifar", "imagenet_places")


@dataclass(frozen=True)
class EvalPass:
    """One evaluation pass the code runs every epoch, with its host syncs.

    Attributes:
        name: ``val`` (the A_C measurement) or ``test``.
        images: images forwarded (eval mode, no grad).
        batch_size: loader batch size.
        syncs_per_batch: ``.item()``/``.cpu()`` reads per batch.
        syncs_per_image: per-sample Python comparisons of device tensors (one sync each).
        syncs_per_correct: extra syncs per correctly classified image.
        syncs_per_pass: reads once per pass (log line, progress lines).
        source: file:lines.
    """

    name: str
    images: int
    batch_size: int
    syncs_per_batch: int
    syncs_per_image: int
    syncs_per_correct: int
    syncs_per_pass: int
    source: str

    @property
    def batches(self) -> int:
        """Loader batches (the last one smaller)."""
        return math.ceil(self.images / self.batch_size)

    def syncs(self, correct: int) -> int:
        """Host syncs of one pass with ``correct`` correctly classified images."""
        return (self.syncs_per_batch * self.batches + self.syncs_per_image * self.images
                + self.syncs_per_correct * correct + self.syncs_per_pass)


@dataclass(frozen=True)
class EpochExtras:
    """What one epoch of the code runs besides its iterations (which ``Loop.step`` covers, meta restarts'
    reshuffles included; their worker start-ups are counted here).

    Attributes:
        tree: ``cifar`` or ``imagenet_places``.
        iterations: training iterations per epoch (``ceil(train / batch)``, the last batch smaller).
        meta_batches_per_pass: meta batches before the meta loader is exhausted.
        train_loader_starts: ``iter(train_loader)`` per epoch.
        meta_loader_starts: the epoch-start ``iter(meta_loader)`` plus the restarts on exhaustion.
        val_loader_starts: val (A_C) passes' loader starts.
        test_loader_starts: test passes' loader starts.
        workers_per_start: worker processes each start spawns (``persistent_workers`` is off everywhere).
        passes: the evaluation passes, in order.
        checkpoint_saves: (fewest, most) ``torch.save`` calls per epoch.
    """

    tree: str
    iterations: int
    meta_batches_per_pass: int
    train_loader_starts: int
    meta_loader_starts: int
    val_loader_starts: int
    test_loader_starts: int
    workers_per_start: int
    passes: tuple[EvalPass, ...]
    checkpoint_saves: tuple[int, int]

    @property
    def meta_restarts(self) -> int:
        """Meta loader restarts inside the epoch (starts after the epoch-start one)."""
        return self.meta_loader_starts - 1

    @property
    def loader_starts(self) -> int:
        """All DataLoader (re)starts per epoch."""
        return self.train_loader_starts + self.meta_loader_starts + self.val_loader_starts + self.test_loader_starts


#: name → (tree, train images, meta/val images, test images) of the code's splits.
OFFICIAL_SETS: dict[str, tuple[str, int, int, int]] = {
    "cifar100_lt_r100": ("cifar", 10302, 2500, 10000),  # cifar_official_train_size(100); C:384 25/class val
    "cifar100_lt_r200": ("cifar", 9022, 2500, 10000),  # the code's default --imbalance 200 (C:320)
    "imagenet_lt": ("imagenet_places", 115846, 10000, 50000),  # 10/class meta = val (imagenet.py:177)
    "places_lt": ("imagenet_places", 62500, 3650, 36500),  # 10/class meta = val (places.py LT_Dataset_Val)
}


def cifar_official_train_size(imbalance: float, class_num: int = 100, per_class: int = 500, val: int = 25) -> int:
    """Training images of the code's CIFAR-LT split: ``val`` per class removed first (C:384-385,
    ``data/data_preprocessing.py``:73-85), then ``int(n·(1/ρ)^(c/(C-1)))`` per class (``data_preprocessing.py``:88-101)."""
    if imbalance == 1:
        return class_num * (per_class - val)
    n = per_class - val
    return sum(int(n * ((1 / imbalance) ** (c / (class_num - 1)))) for c in range(class_num))


def epoch_extras(
    tree: str, *, train_images: int, meta_images: int, test_images: int, batch_size: int = 128,
    meta_batch: int = 100, print_freq: int = 200,
) -> EpochExtras:
    """Per-epoch extras of ``tree`` for the given set sizes (see ``OFFICIAL_SETS``), read from the code.

    CIFAR: one val pass after every epoch (C:250-271, batch 256, C:467) and one test pass (C:284, C:291-312,
    batch 256, C:469), each comparing predictions sample by sample with a device sync per image (C:267-269,
    C:308-310); a checkpoint when val accuracy improves (C:280-282); 8 workers per loader (C:465-469).
    ImageNet/Places: ``validate`` on the val set before every epoch (I:302, batch 128, ``datasets/imagenet.py``:260-263)
    and on the test set after it (I:308, batch = train batch), 4 syncs per batch (I:514, I:526-528) and 5 per pass
    (I:542) plus 4 per progress line (I:534-535); a checkpoint every epoch (I:315-332, I:550-554); 48 workers
    (config ``workers: 48``).
    """
    iterations = math.ceil(train_images / batch_size)  # drop_last False; I:382's break never fires before the end
    per_pass = math.ceil(meta_images / meta_batch)
    meta_starts = math.ceil(iterations / per_pass)  # C:142 / I:359 once, then C:196-197 / I:423-424 on exhaustion
    if tree == "cifar":
        passes = (
            EvalPass("val", meta_images, 256, 1, 1, 1, 0, "C:250-271"),
            EvalPass("test", test_images, 256, 1, 1, 1, 0, "C:291-312"),
        )
        return EpochExtras(tree, iterations, per_pass, 1, meta_starts, 1, 1, 8, passes, (0, 1))
    if tree == "imagenet_places":

        def lines(images: int, batch: int) -> int:
            return 5 + 4 * math.ceil(math.ceil(images / batch) / print_freq)

        passes = (
            EvalPass("val", meta_images, 128, 4, 0, 0, lines(meta_images, 128), "I:302, I:475-547"),
            EvalPass("test", test_images, batch_size, 4, 0, 0, lines(test_images, batch_size), "I:308, I:475-547"),
        )
        return EpochExtras(tree, iterations, per_pass, 1, meta_starts, 1, 1, 48, passes, (1, 1))
    raise ValueError(f"unknown tree {tree!r}; expected one of {_TREES}")
