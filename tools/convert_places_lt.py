"""Convert Places-LT (Places365 images + the OLTR split files) to FFCV .beton and WebDataset shards."""

from __future__ import annotations

import sys
from pathlib import Path

from dnet_fast.convert.cli import SplitDefaults, run_split_converter
from dnet_fast.convert.golden import GOLDEN

__all__ = ["DEFAULTS", "main"]

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "splits"  # ../shared/splits beside the checkout

DEFAULTS = SplitDefaults(
    dataset="places_lt",
    num_classes=365,
    lists={s: str(SPLITS / f"Places_LT_{s}.txt") for s in ("train", "val", "test")},
    golden=GOLDEN["places_lt"],  # 62,500 train / 365 classes / max 4,980 / min 5; val 7,300; test 36,500
)


def main(argv: list[str] | None = None) -> int:
    """``python tools/convert_places_lt.py --root PLACES365 --out DIR`` (OLTR or Places365 data_256 layout)."""
    return run_split_converter(argv, DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
