"""Convert Places-LT (Places365 images + the OLTR split files) to shards: ``dnet-fast convert places-lt``."""

from __future__ import annotations

import sys

from dnet_fast.convert.cli import main as convert_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Same as ``dnet-fast convert places-lt ARGS`` (see ``--help``)."""
    args = sys.argv[1:] if argv is None else argv
    return convert_main(["places-lt", *args])


if __name__ == "__main__":
    sys.exit(main())
