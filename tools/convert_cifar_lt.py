"""Convert CIFAR-10/100-LT (python pickles; LT profile and meta set as the cifar*_lt datasets) to shards: ``dnet-fast convert cifar-lt``."""

from __future__ import annotations

import sys

from dnet_fast.convert.cli import main as convert_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Same as ``dnet-fast convert cifar-lt ARGS`` (see ``--help``)."""
    args = sys.argv[1:] if argv is None else argv
    return convert_main(["cifar-lt", *args])


if __name__ == "__main__":
    sys.exit(main())
