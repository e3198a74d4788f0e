"""dnet-fast: fast Difficulty-Net training for long-tailed image recognition."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
