"""Crash-safe file writes: a temporary name beside the target, fsync, rename, fsync the directory; checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_SUFFIX",
    "atomic_open",
    "atomic_path",
    "atomic_write_json",
    "finite_json",
    "fsync_dir",
    "publish",
    "sha256_file",
    "tmp_path_for",
]

# The converter deletes ``*.tmp`` leftovers of a killed run (``convert.journal.remove_tmp_files``).
TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


def tmp_path_for(final: str | Path) -> Path:
    """The temporary name ``final`` is written under: ``final + '.tmp'``.

    Same directory, so the same file system, so the final rename is atomic.
    """
    final = Path(final)
    return final.with_name(final.name + TMP_SUFFIX)


def publish(tmp: str | Path, final: str | Path) -> None:
    """Makes the complete file ``tmp`` durable and renames it over ``final`` (readers see old or new, never half)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    Path(tmp).replace(final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write ``final`` to; on success publishes it, on any error deletes it.

    A process killed inside the block leaves only the ``.tmp`` file, which no reader accepts and
    ``convert.journal.remove_tmp_files`` deletes on the next conversion. Parent directories are created.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` through :func:`atomic_path`: ``path`` is replaced only when the block succeeds.

    On error the temporary file is removed and ``path`` is untouched. Text modes write UTF-8.
    """
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def finite_json(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` with every NaN / ±inf float replaced by None (JSON has no such numbers; ``json`` would write
    ``NaN``, which strict readers reject); ``default`` converts other objects first (as in ``json.dumps``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v, default) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v, default) for v in obj]
    if obj is None or isinstance(obj, str | int | bool) or default is None:
        return obj
    return finite_json(default(obj), None)


def atomic_write_json(
    path: str | Path, obj: Any, *, indent: int = 1, default: Callable[[Any], Any] | None = None
) -> None:
    """Writes ``obj`` as indented, strictly valid JSON (and a final newline) through :func:`atomic_path`.

    Args:
        path: the file to create or replace.
        obj: JSON-ready data; ``default`` converts anything else (as in ``json.dumps``); non-finite floats are
            written as null (`finite_json`).
        indent: spaces per level.
        default: called for objects ``json`` cannot serialise.
    """
    text = json.dumps(finite_json(obj, default), indent=indent, allow_nan=False)
    with atomic_open(path, "w") as f:
        f.write(text + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Makes a rename in directory ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
