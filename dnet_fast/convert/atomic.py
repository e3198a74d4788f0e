"""Crash-safe outputs: temporary names renamed when complete, checksums, and the resume journal."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_SUFFIX",
    "atomic_path",
    "atomic_write_json",
    "file_record",
    "fsync_dir",
    "remove_tmp_files",
    "sha256_file",
]

TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file, as stored in meta.json."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields ``final + '.tmp'`` to write to; on success fsyncs and renames it to ``final``, else deletes it.

    A process killed inside the block leaves only the ``.tmp`` file, which no reader accepts and the next
    conversion deletes.
    """
    final = Path(final)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def fsync_dir(path: str | Path) -> None:
    """Makes a rename durable (POSIX); a no-op where directories cannot be opened."""
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


def remove_tmp_files(directory: str | Path) -> list[Path]:
    """Deletes leftovers of an interrupted run (``*.tmp``); returns what was removed."""
    removed = sorted(Path(directory).glob(f"*{TMP_SUFFIX}"))
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
