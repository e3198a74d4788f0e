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


def atomic_write_json(
    path: str | Path, obj: Any, *, indent: int = 1, default: Callable[[Any], Any] | None = None
) -> None:
    """Writes ``obj`` as indented, valid JSON (and a final newline) through :func:`atomic_path`.

    NaN and ±inf, which ``json`` would write as the invalid tokens ``NaN`` / ``Infinity``, are written as null.

    Args:
        path: the file to create or replace.
        obj: JSON-ready data; ``default`` converts anything else (as in ``json.dumps``).
        indent: spaces per level.
        default: called for objects ``json`` cannot serialise.
    """
    convert = None if default is None else (lambda o: finite_json(default(o)))
    text = json.dumps(finite_json(obj), indent=indent, default=convert, allow_nan=False)
    with atomic_open(path, "w") as f:
        f.write(text + "\n")


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) in its dicts, lists and tuples replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


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
