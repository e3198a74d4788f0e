"""Convert ImageNet-LT (ILSVRC2012 images + split files; the train list is user-supplied) to shards."""

from __future__ import annotations

import sys
from pathlib import Path

from dnet_fast.convert.cli import SplitDefaults, run_split_converter
from dnet_fast.convert.golden import GOLDEN

__all__ = ["DEFAULTS", "main"]

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "splits"  # ../shared/splits beside the checkout

DEFAULTS = SplitDefaults(
    dataset="imagenet_lt",
    num_classes=1000,
    # ImageNet_LT_train.txt is not shipped: --train-list is required (its git blob is checked, SPEC §9).
    lists={"val": str(SPLITS / "ImageNet_LT_val.txt"), "test": str(SPLITS / "ImageNet_LT_test.txt")},
    golden=GOLDEN["imagenet_lt"],
)


def main(argv: list[str] | None = None) -> int:
    """``python tools/convert_imagenet_lt.py --root ILSVRC2012 --train-list ImageNet_LT_train.txt --out DIR``."""
    return run_split_converter(argv, DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
