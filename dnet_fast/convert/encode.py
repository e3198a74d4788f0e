"""Worker-side image encoding; imports only Pillow and NumPy so that spawned workers start fast."""

from __future__ import annotations

from typing import Any

from dnet_fast.convert.images import BadImage, ImageOptions, Prepared, prepare_array, prepare_file

__all__ = ["encode_task", "init_worker"]

_OPTS: list[ImageOptions] = []


def init_worker(opts: ImageOptions) -> None:
    """Pool initializer: the options every task of this conversion uses."""
    _OPTS[:] = [opts]


def encode_task(task: tuple[int, str, Any]) -> tuple[int, Prepared | BadImage]:
    """``(index, "file", path)`` or ``(index, "array", (H, W, 3) uint8)`` → (index, Prepared or the BadImage)."""
    i, kind, payload = task
    try:
        if kind == "file":
            return i, prepare_file(payload, _OPTS[0])
        return i, prepare_array(payload, _OPTS[0])
    except BadImage as err:
        return i, err
