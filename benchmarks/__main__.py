"""``python -m benchmarks`` runs the benchmark runner."""

from __future__ import annotations

import sys

from benchmarks.runner import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
