"""Conversion inputs: split-file entries under an image root (OLTR or Places365 layout) and in-memory arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dnet_fast.convert.splitfile import Entry
from dnet_fast.data.splits import LAYOUTS

__all__ = ["LAYOUT_NAMES", "ArraySource", "FileSource", "Source", "detect_layout"]

LAYOUT_NAMES = ("auto", *LAYOUTS)
_PROBE = 32  # entries tried when detecting the on-disk layout (some of them may be bad)


def detect_layout(root: Path, entries: tuple[Entry, ...]) -> str:
    """The first of ``splits.LAYOUTS`` (as listed, Places365 ``data_256``, flat ImageNet ``val/``) under which one
    of the first entries exists; ``as_listed`` when none does (the missing files are then reported)."""
    for name, mapping in LAYOUTS.items():
        if any((root / mapping(e.path)).is_file() for e in entries[:_PROBE]):
            return name
    return "as_listed"


class FileSource:
    """Images named by split-file entries.

    Args:
        root: image root.
        entries: the split's accepted entries.
        labels: (N,) class ids to store (already mapped to contiguous ids).
        layout: a name of ``splits.LAYOUTS`` (how listed paths map to files), or ``auto`` to detect it.
    """

    def __init__(
        self, root: str | Path, entries: tuple[Entry, ...], labels: np.ndarray, layout: str = "auto"
    ) -> None:
        self.root = Path(root)
        self.entries = entries
        self.labels = np.asarray(labels, dtype=np.int64)
        self.layout = detect_layout(self.root, entries) if layout == "auto" else layout
        self._map = LAYOUTS[self.layout]

    def __len__(self) -> int:
        return len(self.entries)

    def where(self, i: int) -> str:
        """``file:line path`` of item ``i``."""
        return self.entries[i].where

    def origin(self, i: int) -> str:
        """Relative source path of item ``i`` (recorded in samples.tsv)."""
        return self.entries[i].path

    def file(self, i: int) -> Path:
        """On-disk path of item ``i``."""
        return self.root / self._map(self.entries[i].path)

    def stamp(self, i: int) -> str:
        """Cheap identity of the source file (size and mtime); ``missing`` / ``empty`` flag bad files."""
        try:
            st = self.file(i).stat()
        except OSError:
            return "missing"
        return "empty" if st.st_size == 0 else f"{st.st_size}:{st.st_mtime_ns}"

    def task(self, i: int) -> tuple[int, str, str]:
        """What a worker needs to encode item ``i`` (see ``encode.encode_task``)."""
        return i, "file", str(self.file(i))

    def fingerprint(self) -> str:
        """Identity of the list (paths and labels), not of the image bytes."""
        h = hashlib.sha256()
        for e, y in zip(self.entries, self.labels, strict=True):
            h.update(f"{e.path}\0{int(y)}\n".encode())
        return h.hexdigest()


class ArraySource:
    """Decoded uint8 (N, H, W, 3) images held in memory (CIFAR-LT), one ``name:index`` origin per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str) -> None:
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name
        if self.images.ndim != 4 or self.images.shape[0] != len(self.labels):
            msg = f"{name}: need (N, H, W, 3) images and N labels, got {self.images.shape} and {len(self.labels)}"
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, i: int) -> str:
        """``name:index`` of item ``i``."""
        return f"{self.name}:{i}"

    def origin(self, i: int) -> str:
        """Same as ``where``."""
        return self.where(i)

    def file(self, i: int) -> Path:
        """On-disk path of item ``i``."""
        return self.root / self._map(self.entries[i].path)

    def stamp(self, i: int) -> str:
        """Content hash of item ``i``."""
        return hashlib.blake2b(self.images[i].tobytes(), digest_size=8).hexdigest()

    def task(self, i: int) -> tuple[int, str, np.ndarray]:
        """What a worker needs to encode item ``i`` (see ``encode.encode_task``)."""
        return i, "array", self.images[i]

    def fingerprint(self) -> str:
        """Hash of all pixels and labels."""
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()


Source = FileSource | ArraySource
