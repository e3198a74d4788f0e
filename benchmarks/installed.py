"""Which ``dnet_fast`` the benchmarks import: an installed build rather than the checkout's unbuilt sources.

Run from a source checkout, ``python -m benchmarks`` puts the checkout first on ``sys.path``, so its
``dnet_fast/`` (no compiled ``_C`` unless built in place) shadows a wheel installed in site-packages and every
benchmark that needs the extension fails to load. This module moves the checkout behind the installed package
when (and only when) the checkout's copy has no ``_C`` and an installed regular package has one.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

__all__ = ["CHECKOUT", "has_extension", "prefer_installed_dnet_fast"]

CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding benchmarks/ (and the sources' dnet_fast/)


def has_extension(package_dir: Path) -> bool:
    """Whether ``package_dir`` holds the compiled ``_C`` module."""
    return any((package_dir / f"_C{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _is_checkout(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == CHECKOUT
    except OSError:
        return False


def _installed_package(paths: list[str]) -> Path | None:
    """The folder of a regular ``dnet_fast`` package with ``_C`` on ``paths`` (None: none there)."""
    spec = importlib.machinery.PathFinder.find_spec("dnet_fast", paths)
    if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
        return None  # absent, or only the extension folder of an editable install (a namespace portion)
    folder = Path(spec.origin).parent
    return folder if has_extension(folder) else None


def _imported_from_checkout() -> bool:
    module = sys.modules.get("dnet_fast")
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve().parent == CHECKOUT / "dnet_fast"


def prefer_installed_dnet_fast() -> str | None:
    """Makes ``import dnet_fast`` find the installed build when the checkout's copy is an unbuilt shadow of it.

    The checkout's ``sys.path`` entries move to the end (``benchmarks`` itself is already imported); a
    ``dnet_fast`` already imported from the checkout is dropped from ``sys.modules`` so the next import loads
    the installed one. Nothing changes for an in-place build, an editable install or a plain checkout.

    Returns:
        The installed package folder now preferred, or None when nothing was changed.
    """
    source = CHECKOUT / "dnet_fast"
    if not source.is_dir() or has_extension(source):
        return None
    others = [p for p in sys.path if not _is_checkout(p)]
    installed = _installed_package(others)
    if installed is None:
        return None
    sys.path[:] = [*others, str(CHECKOUT)]
    if _imported_from_checkout():
        for name in [m for m in sys.modules if m == "dnet_fast" or m.startswith("dnet_fast.")]:
            del sys.modules[name]
    return str(installed)
