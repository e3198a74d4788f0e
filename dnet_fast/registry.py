"""A generic name → constructor registry used for losses, models, datasets, loaders and meta modes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised when a name is not registered; the message lists the valid names."""


class Registry(Generic[T]):
    """Maps names to objects (usually constructors).

    Args:
        kind: what the registry holds ("loss", "model", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; re-registering a name warns and replaces it."""

        def decorate(obj: T) -> T:
            if name in self._items:
                warnings.warn(f"{self.kind} '{name}' registered twice; the later one wins", stacklevel=2)
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``.

        Raises:
            UnknownNameError: ``name`` is not registered (the message lists the valid names).
        """
        try:
            return self._items[name]
        except KeyError:
            msg = f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}"
            raise UnknownNameError(msg) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
