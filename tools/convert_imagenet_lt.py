"""Convert ImageNet-LT (ILSVRC2012 images + the OLTR split files; the train list is user-supplied) to shards: ``dnet-fast convert imagenet-lt``."""

from __future__ import annotations

import sys

from dnet_fast.convert.cli import main as convert_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Same as ``dnet-fast convert imagenet-lt ARGS`` (see ``--help``)."""
    args = sys.argv[1:] if argv is None else argv
    return convert_main(["imagenet-lt", *args])


if __name__ == "__main__":
    sys.exit(main())
