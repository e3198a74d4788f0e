"""Training-time integrity of a converted directory: meta.json's SHA-256 checked once per file, then recorded.

Before training trusts a converted directory, every file that ``meta.json`` lists (tars, their indexes, betons,
sample tables, the report) is hashed and compared with its recorded SHA-256, so a byte flipped on disk or in a
copy stops the run before anything is written instead of training silently on other pixels.

A file that passed is entered in a small **verification record** under its name, with its size, mtime, ctime,
inode and the SHA-256 meta.json records for it. A later run hashes only the files whose entry no longer matches:
a re-conversion changes the recorded SHA-256, any write changes the mtime and the ctime (the ctime cannot be
set back, so even an edit that restores the mtime is caught), a copy changes the inode. Everything else costs
one ``stat`` per file.

The record is ``<root>/.verified.json`` when the directory is writable (shared by every machine reading that
file system), else ``<cache>/verified/<16 hex of SHA-256 of the resolved root>.json`` where ``<cache>`` is
``$DNET_FAST_CACHE``, else ``$XDG_CACHE_HOME/dnet-fast``, else ``~/.cache/dnet-fast``. An unreadable or damaged
record counts as empty (everything is hashed again). Records are written atomically under a unique temporary
name, so concurrent runs (data-parallel ranks) at worst hash the same files twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnet_fast import atomic
from dnet_fast.shardformat import META_NAME, ShardDataError

__all__ = [
    "CACHE_ENV",
    "RECORD_FORMAT",
    "RECORD_NAME",
    "ShardIntegrityError",
    "Verified",
    "cache_record_path",
    "verify_checksums",
]

RECORD_NAME = ".verified.json"  # beside the data; the converter never deletes or lists it
RECORD_FORMAT = "dnet-fast-verified/1"
CACHE_ENV = (
    "DNET_FAST_CACHE"  # per-user cache folder (default $XDG_CACHE_HOME/dnet-fast or ~/.cache/dnet-fast)
)
_MAX_NAMED = 8  # changed files named in one message
_MAX_THREADS = 8  # hashlib releases the GIL: files are hashed in parallel threads


class ShardIntegrityError(ShardDataError):
    """A file of a converted directory whose SHA-256 differs from meta.json's; the message names it."""


@dataclass(frozen=True)
class Verified:
    """What one :func:`verify_checksums` call did.

    Attributes:
        files: files checked (all that meta.json lists).
        hashed: files hashed now (the others matched the record).
        hashed_bytes: bytes hashed now.
        seconds: wall time of the whole check, stats and record included.
        record: where the record was written, or None when nothing was hashed or no location was writable.
    """

    files: int
    hashed: int
    hashed_bytes: int
    seconds: float
    record: Path | None


def cache_record_path(root: str | Path) -> Path | None:
    """The per-user record of ``root`` (used when ``root`` itself is not writable); None without a home folder."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        try:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dnet-fast"
        except (RuntimeError, KeyError):  # Path.home() without HOME or a passwd entry
            return None
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(base) / "verified" / f"{digest}.json"


def verify_checksums(
    root: str | Path, files: Mapping[str, Mapping[str, Any]], *, threads: int = 0
) -> Verified:
    """Checks every file of ``files`` (meta.json's ``files``) under ``root`` against its recorded SHA-256.

    Files whose verification record entry still matches are not read again; the others are hashed (in parallel)
    and, when all match, recorded.

    Args:
        root: the converted directory.
        files: name -> ``{"sha256": ..., "bytes": ...}`` as in meta.json.
        threads: hashing threads; 0 picks ``min(8, CPUs)``.

    Raises:
        ShardIntegrityError: some file's SHA-256 differs from the recorded one (one line naming the files).
        OSError: a file cannot be read (missing files are load_meta's to report first).
    """
    start = time.perf_counter()
    root = Path(root).resolve()
    # stat before hashing: a file changed while being hashed keeps its old identity and is hashed again next time.
    identity = {name: _identity(root / name, rec) for name, rec in files.items()}
    known = _read_records(root)
    todo = sorted((n for n in files if known.get(n) != identity[n]), key=lambda n: -int(files[n]["bytes"]))
    found = _hash_files(root, todo, threads)
    bad = sorted(n for n in todo if found[n] != files[n]["sha256"])
    if bad:
        raise ShardIntegrityError(_mismatch_message(root, bad, files, found))
    record = _write_record(root, identity) if todo else None
    hashed_bytes = sum(int(files[n]["bytes"]) for n in todo)
    return Verified(len(files), len(todo), hashed_bytes, time.perf_counter() - start, record)


def _identity(path: Path, rec: Mapping[str, Any]) -> dict[str, Any]:
    st = path.stat()
    return {
        "sha256": rec["sha256"],
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


def _hash_files(root: Path, names: list[str], threads: int) -> dict[str, str]:
    if not names:
        return {}
    workers = min(len(names), threads or min(_MAX_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda n: atomic.sha256_file(root / n), names)
        return dict(zip(names, digests, strict=True))


def _mismatch_message(
    root: Path, bad: list[str], files: Mapping[str, Mapping[str, Any]], found: dict[str, str]
) -> str:
    fix = (
        "the data changed after conversion (damaged on disk or in a copy): restore it from a good copy, or "
        "re-run the converter with the same arguments and source images (it rewrites the changed units)"
    )
    if len(bad) == 1:
        name = bad[0]
        return (
            f"{root / name}: SHA-256 {found[name][:16]}... differs from {files[name]['sha256'][:16]}... recorded in "
            f"{root / META_NAME}: {fix}"
        )
    named = ", ".join(bad[:_MAX_NAMED]) + (
        f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    )
    return f"{root}: {len(bad)} files differ from the SHA-256 recorded in {META_NAME}: {named}: {fix}"


def _read_records(root: Path) -> dict[str, Any]:
    """Entries of the record beside the data and of the cache record, the former winning."""
    entries: dict[str, Any] = {}
    for path in (cache_record_path(root), root / RECORD_NAME):
        if path is None:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(data, dict)
            and data.get("format") == RECORD_FORMAT
            and isinstance(data.get("files"), dict)
        ):
            entries.update(data["files"])
    return entries


def _write_record(root: Path, identity: dict[str, Any]) -> Path | None:
    body = json.dumps({"format": RECORD_FORMAT, "root": str(root), "files": identity}, indent=1) + "\n"
    for path in (root / RECORD_NAME, cache_record_path(root)):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A unique temporary name (``*.tmp``, which the converter cleans up): ranks may write at once.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=atomic.TMP_SUFFIX)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(body)
                    os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; other users may read the record
                atomic.publish(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            continue  # read-only directory: try the per-user cache; neither writable: hash again next run
        return path
    return None
