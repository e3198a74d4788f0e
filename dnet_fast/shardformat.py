"""The on-disk format of a converted directory: tar shards with DALI index files, samples.tsv, meta.json.

Written by ``dnet_fast.convert``, read by ``dnet_fast.data.shards`` (and the ffcv/dali loaders); both import this
module, neither imports the other. A converted directory holds, per split, WebDataset tar shards
``<split>-NNNNNN.tar`` whose members are ``<key>.<ext>`` (image bytes) and ``<key>.cls`` (ASCII class id), a
``wds2idx`` index ``.idx`` beside each tar, ``<split>.samples.tsv`` (key, label, source per sample, in stored order),
optionally ``<split>.beton`` (FFCV), and ``meta.json`` (classes, counts, groups, every file's size and SHA-256),
written last: its presence marks a complete conversion.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.atomic import atomic_path, publish, sha256_file, tmp_path_for

__all__ = [
    "INDEX_VERSION",
    "META_NAME",
    "ShardDataError",
    "ShardReader",
    "ShardWriter",
    "file_ok",
    "file_record",
    "meta_digest",
    "read_index",
    "read_meta",
    "read_samples",
    "sample_key",
    "sample_sources",
    "samples_name",
    "write_samples",
]

INDEX_VERSION = "v1.2"  # the version line DALI's fn.readers.webdataset expects (same as its wds2idx tool)
META_NAME = "meta.json"  # written last: its presence with matching checksums marks a complete conversion
_SAMPLES_HEADER = "key\tlabel\tsource\n"
_BLOCK = 512


class ShardDataError(ValueError):
    """Bad bytes in a converted directory (a changed file; a damaged meta.json, table, index or class member).

    The message is one line naming the file and, where there is one, the line or the sample.
    """


def sample_key(index: int) -> str:
    """Tar member stem of sample ``index`` of a split (zero-padded so lexical order = sample order)."""
    return f"{index:08d}"


class ShardWriter:
    """Writes one tar shard and its index under temporary names; ``close()`` renames both.

    Members are ``<key>.<ext>`` (image bytes) and ``<key>.cls`` (ASCII class id, the WebDataset convention),
    with fixed owner, mode and mtime so that equal inputs give byte-identical shards.

    Args:
        tar_path: final ``.tar`` path; the index goes to the same stem with ``.idx``.
    """

    def __init__(self, tar_path: str | Path) -> None:
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._tmp = tmp_path_for(self.tar_path)
        # Held open across add() calls; close() or abort() releases it.
        self._file = open(self._tmp, "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._lines: list[str] = []

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, key: str, ext: str, data: bytes, label: int) -> None:
        """Appends one sample (image bytes with extension ``ext`` and its class id)."""
        parts = [self._member(f"{key}.{ext}", data), self._member(f"{key}.cls", str(int(label)).encode())]
        self._lines.append(" ".join(parts))

    def _member(self, name: str, data: bytes) -> str:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        # USTAR with a short name has exactly one 512-byte header block before the data.
        padded = -(-len(data) // _BLOCK) * _BLOCK
        if self._tar.offset != start + _BLOCK + padded:
            msg = f"unexpected tar header size for member {name} in {self.tar_path}"
            raise RuntimeError(msg)
        return f"{name.rsplit('.', 1)[1]} {start + _BLOCK} {len(data)} {name}"

    def close(self) -> None:
        """Finishes the tar, writes the index, and renames both to their final names (index first)."""
        self._tar.close()
        self._file.close()
        # Index first: an index without its tar is an orphan the next run deletes; a tar is never indexless.
        with atomic_path(self.idx_path) as idx_tmp:
            idx_tmp.write_text(f"{INDEX_VERSION} {len(self._lines)}\n" + "\n".join(self._lines) + "\n")
        publish(self._tmp, self.tar_path)

    def abort(self) -> None:
        """Discards the temporary files (used when conversion stops)."""
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def read_index(idx_path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parses a ``wds2idx`` index: one ``{ext: (offset, size)}`` per sample, in tar order.

    Raises:
        ShardDataError: bad header, line or sample count (the message names the file and line).
    """
    idx_path = Path(idx_path)
    lines = _text_lines(idx_path)
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        msg = f"{idx_path}:1: expected '{INDEX_VERSION} <count>', got '{lines[0] if lines else ''}'"
        raise ShardDataError(msg)
    out = []
    for lineno, line in enumerate(lines[1:], start=2):
        f = line.split()
        if len(f) % 4 or not all(f[i + 1].isdigit() and f[i + 2].isdigit() for i in range(0, len(f), 4)):
            msg = f"{idx_path}:{lineno}: expected groups of '<ext> <offset> <size> <name>'"
            raise ShardDataError(msg)
        out.append({f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)})
    if len(out) != int(head[1]):
        msg = f"{idx_path}: header says {head[1]} samples, found {len(out)}"
        raise ShardDataError(msg)
    return out


def _text_lines(path: Path) -> list[str]:
    """The UTF-8 lines of a table or index file; a byte that is not UTF-8 is reported with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        msg = f"{path}:{lineno}: not valid UTF-8 (byte {err.start}); the file is damaged"
        raise ShardDataError(msg) from None


class ShardReader:
    """Random access to the samples of a split's shards through their index files (memory-mapped tars).

    Args:
        tars: the split's tar shards in order; each needs its ``.idx`` beside it.
    """

    def __init__(self, tars: list[Path]) -> None:
        self.tars = [Path(t) for t in tars]
        self._where: list[tuple[int, int, int, str]] = []  # (shard, offset, size, ext) per sample
        self._labels: list[tuple[int, int, int]] = []
        for s, tar in enumerate(self.tars):
            idx = tar.with_suffix(".idx")
            for n, members in enumerate(read_index(idx), start=2):
                ext = next((e for e in members if e != "cls"), None)
                if ext is None or "cls" not in members:
                    msg = f"{idx}:{n}: expected an image member and a .cls member, got {sorted(members)}"
                    raise ShardDataError(msg)
                self._where.append((s, *members[ext], ext))
                self._labels.append((s, *members["cls"]))
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self._where)

    def _map(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            with open(self.tars[shard], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def image_bytes(self, i: int) -> bytes:
        """Encoded image bytes of sample ``i``."""
        shard, off, size, _ = self._where[i]
        return self._map(shard)[off : off + size]

    def ext(self, i: int) -> str:
        """Stored image extension of sample ``i`` (``jpg`` or ``png``)."""
        return self._where[i][3]

    def tar_of(self, i: int) -> Path:
        """The tar shard holding sample ``i``."""
        return self.tars[self._where[i][0]]

    def member_name(self, i: int) -> str:
        """Name of sample ``i``'s image member (``<key>.<ext>``), read from its tar header (for messages)."""
        shard, off, _, _ = self._where[i]
        header = self._map(shard)[max(off - _BLOCK, 0) : max(off - _BLOCK, 0) + 100]
        return header.split(b"\0", 1)[0].decode("utf-8", "replace")

    def labels(self) -> np.ndarray:
        """int64 (N,) class ids read from the ``.cls`` members.

        Raises:
            ShardDataError: a ``.cls`` member is not an ASCII integer (names the shard and the sample).
        """
        out = np.empty(len(self._labels), dtype=np.int64)
        for i, (s, o, n) in enumerate(self._labels):
            text = self._map(s)[o : o + n]
            if not text.isdigit():
                name = self.member_name(i).rsplit(".", 1)[0]
                msg = f"{self.tars[s]}: sample {name}: class member {bytes(text[:16])!r} is not an integer"
                raise ShardDataError(msg)
            out[i] = int(text)
        return out

    def close(self) -> None:
        """Unmaps the tars."""
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __getstate__(self) -> dict:
        # mmaps cannot be pickled (worker processes); each process maps the tars again on first use.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


# ----------------------------------------------------------------------------------------------------------
# samples.tsv and meta.json


def samples_name(split: str) -> str:
    """File name of a split's sample table."""
    return f"{split}.samples.tsv"


def write_samples(path: str | Path, rows: Iterable[tuple[str, int, str]]) -> None:
    """Writes a sample table atomically: one ``key<TAB>label<TAB>source`` line per (key, label, source) row."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(_SAMPLES_HEADER)
        for key, label, source in rows:
            f.write(f"{key}\t{int(label)}\t{source}\n")


def read_samples(path: str | Path) -> tuple[tuple[str, ...], np.ndarray]:
    """(keys, labels int64 (N,)) of a sample table, in stored order.

    Raises:
        ShardDataError: a damaged table (the message names the file and line).
    """
    rows = _sample_rows(Path(path))
    return tuple(r[0] for r in rows), np.array([int(r[1]) for r in rows], dtype=np.int64)


def sample_sources(path: str | Path) -> tuple[str, ...]:
    """The ``source`` column of a sample table (where each stored sample came from), in stored order."""
    return tuple(r[2] for r in _sample_rows(Path(path)))


def _sample_rows(path: Path) -> list[list[str]]:
    lines = _text_lines(path)
    if not lines or lines[0] + "\n" != _SAMPLES_HEADER:
        msg = f"{path}:1: expected the header '{_SAMPLES_HEADER.strip()}'"
        raise ShardDataError(msg)
    rows = [line.split("\t", 2) for line in lines[1:]]
    for lineno, r in enumerate(rows, start=2):
        if len(r) != 3 or not r[1].isdigit():
            msg = f"{path}:{lineno}: expected 'key<TAB>label<TAB>source', got {lines[lineno - 1][:80]!r}"
            raise ShardDataError(msg)
    return rows


def read_meta(out: Path) -> dict[str, Any] | None:
    """The parsed ``out/meta.json``, or None when there is none (not a conversion, or one that did not finish).

    Raises:
        ShardDataError: meta.json is not valid JSON, or (see :func:`meta_digest`) its content differs from the
            digest recorded in it.
    """
    path = Path(out) / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        msg = f"{path}: not valid JSON ({err}); the file is damaged: re-run the converter to rewrite it"
        raise ShardDataError(msg) from None
    recorded = meta.get("digest") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or (recorded is not None and recorded != meta_digest(meta)):
        msg = (
            f"{path}: content differs from the digest recorded in it: the file was edited or damaged after "
            "conversion; re-run the converter to rewrite it"
        )
        raise ShardDataError(msg)
    return meta


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of meta.json's content without its own ``digest`` field, as canonical JSON.

    The converter stores it as ``digest``; :func:`read_meta` recomputes it, so a changed class count, mean or
    file checksum in meta.json itself is caught too (meta.json written before the field existed has none).
    """
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file, as stored in the journal and meta.json."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def file_ok(path: Path, rec: dict[str, Any], *, checksum: bool = True) -> bool:
    """Whether ``path`` exists with the recorded size and (with ``checksum``) the recorded SHA-256."""
    if not path.is_file() or path.stat().st_size != rec["bytes"]:
        return False
    return not checksum or sha256_file(path) == rec["sha256"]
