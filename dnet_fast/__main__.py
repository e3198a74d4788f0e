"""``python -m dnet_fast`` runs the command-line interface."""

from __future__ import annotations

import sys

from dnet_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
