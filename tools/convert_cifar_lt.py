"""Convert CIFAR-10/100-LT (python pickles; LT profile and meta set as the cifar*_lt datasets) to shards."""

from __future__ import annotations

import sys

from dnet_fast.convert.cli import run_cifar

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python tools/convert_cifar_lt.py --root CIFAR --classes 100 --imbalance 100 --out DIR`` (lossless PNG)."""
    return run_cifar(argv)


if __name__ == "__main__":
    sys.exit(main())
