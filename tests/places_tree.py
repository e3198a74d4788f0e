"""A miniature Places-LT tree built from the real split files: a few classes, small generated JPEGs, bad files."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dnet_fast.convert import ConvertOptions, ImageOptions, convert, read_splits, split_file_input
from dnet_fast.convert.beton import ffcv_available

__all__ = [
    "BAD_KINDS",
    "REPAIRED_KINDS",
    "SPLITS_DIR",
    "MiniTree",
    "build_tree",
    "class_color",
    "make_bad",
    "needs_splits",
]

# The real ImageNet-LT / Places-LT split files: $DNET_SPLITS_DIR, else ../shared/splits beside the checkout. A clone
# elsewhere without them skips the tests that read them (saying so) instead of failing on a missing file.
SPLITS_DIR = Path(os.environ.get("DNET_SPLITS_DIR") or Path(__file__).resolve().parents[2] / "shared" / "splits")
_NO_SPLITS = f"real split files not found at {SPLITS_DIR} (set DNET_SPLITS_DIR to the folder holding them)"
needs_splits = pytest.mark.skipif(not SPLITS_DIR.is_dir(), reason=_NO_SPLITS)
CLASSES = (0, 1, 2, 3, 4)  # airfield ... amusement_arcade: first lines of every real list
PER_CLASS = {"train": 6, "val": 3, "test": 3}
HARD_KINDS = (
    "missing",
    "corrupt",
    "truncated",
    "empty",
    "too_large",
    "label_out_of_range",
    "malformed",
    "extra_column",
    "duplicate",
    "escapes_root",
    "absolute",
)
BAD_KINDS = HARD_KINDS
REPAIRED_KINDS = ("cmyk", "grayscale", "png_as_jpg", "very_large")


def class_color(label: int) -> tuple[int, int, int]:
    """The flat colour images of original class ``label`` are painted with (recoverable after JPEG)."""
    return (40 + 40 * (label % 5), 200 - 30 * (label % 6), 60 + 25 * (label % 7))


def _image(label: int, i: int, size: tuple[int, int]) -> Image.Image:
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[:] = class_color(label)
    yy, xx = np.mgrid[0:h, 0:w]
    arr[..., 1] = (arr[..., 1].astype(np.int64) + ((xx * 3 + yy * 2 + i * 7) % 24)).clip(
        0, 255
    )  # some texture
    return Image.fromarray(arr, "RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@dataclass
class MiniTree:
    """The generated tree: image root, split files and the lines written to each."""

    root: Path
    lists: dict[str, Path]
    lines: dict[str, list[str]] = field(default_factory=dict)

    def append(self, split: str, line: str, raw: bytes | None = None) -> int:
        """Adds a line (``raw`` bytes verbatim, e.g. with CR) to a split file; returns its 1-based line number."""
        self.lines[split].append(line)
        with open(self.lists[split], "ab") as f:
            f.write(raw if raw is not None else (line + "\n").encode())
        return len(self.lines[split])


def build_tree(base: Path, sizes: tuple[tuple[int, int], ...] = ((64, 64), (80, 64))) -> MiniTree:
    """Writes the first ``PER_CLASS`` lines of each class in ``CLASSES`` from the real Places-LT lists.

    Images alternate over ``sizes`` (W, H) and are flat ``class_color`` with a small texture. Skips the calling
    test when the real split files are absent (``SPLITS_DIR``).
    """
    if not SPLITS_DIR.is_dir():
        pytest.skip(_NO_SPLITS)
    root = base / "images"
    tree = MiniTree(root, {s: base / f"Places_LT_{s}.txt" for s in PER_CLASS})
    for split, cap in PER_CLASS.items():
        taken: dict[int, int] = {}
        chosen = []
        for line in (SPLITS_DIR / f"Places_LT_{split}.txt").read_text().splitlines():
            rel, label = line.rsplit(" ", 1)
            y = int(label)
            if y in CLASSES and taken.get(y, 0) < cap:
                taken[y] = taken.get(y, 0) + 1
                chosen.append(line)
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_jpeg(_image(y, len(chosen), sizes[len(chosen) % len(sizes)])))
        tree.lines[split] = chosen
        tree.lists[split].write_text("\n".join(chosen) + "\n")
    return tree


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def make_bad(tree: MiniTree, kind: str, split: str = "train", label: int = 1) -> tuple[int, str]:
    """Adds one bad (or repairable) entry of ``kind`` to ``split``; returns (line number, listed path)."""
    rel = f"train/bad_{kind}/{kind}.jpg"
    path = tree.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    good = _jpeg(_image(label, 0, (64, 64)))
    writers = {
        "corrupt": lambda: path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8),
        "truncated": lambda: path.write_bytes(good[: len(good) // 2]),
        "empty": lambda: path.write_bytes(b""),
        "too_large": lambda: path.write_bytes(_png_header_only(20_000, 10_000)),
        "cmyk": lambda: _save(Image.new("CMYK", (64, 64), (0, 200, 100, 30)), path, "JPEG"),
        "grayscale": lambda: _save(Image.new("L", (64, 64), 128), path, "JPEG"),
        "png_as_jpg": lambda: _save(_image(label, 0, (64, 64)), path, "PNG"),
        "very_large": lambda: _save(Image.new("RGB", (4200, 4000), class_color(label)), path, "JPEG"),
    }
    if kind in writers:
        writers[kind]()
        return tree.append(split, f"{rel} {label}"), rel
    if kind == "missing":
        return tree.append(split, f"train/bad_missing/nowhere.jpg {label}"), "train/bad_missing/nowhere.jpg"
    if kind == "label_out_of_range":
        first = tree.lines[split][0].rsplit(" ", 1)[0]
        return tree.append(split, f"{first}x.jpg 400"), f"{first}x.jpg"
    if kind == "malformed":
        return tree.append(split, "train/airfield/no_label.jpg"), "train/airfield/no_label.jpg"
    if kind == "extra_column":  # an existing image: the line is malformed, not a missing file named "x.jpg 1"
        _save(_image(label, 0, (64, 64)), path, "JPEG")
        return tree.append(split, f"{rel} {label} 7"), rel
    if kind == "duplicate":
        line = tree.lines[split][0]
        return tree.append(split, line), line.rsplit(" ", 1)[0]
    if kind == "escapes_root":
        return tree.append(split, f"train/../../outside.jpg {label}"), "train/../../outside.jpg"
    if kind == "absolute":
        return tree.append(split, f"/etc/hostname {label}"), "/etc/hostname"
    msg = f"unknown bad kind {kind}"
    raise ValueError(msg)


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    img.save(path, format=fmt)


def converted_tree(base: Path, max_side: int) -> Path:
    """The miniature Places-LT tree converted losslessly (PNG shards of 8, raw .beton when ffcv is installed):
    the output folder."""
    tree = build_tree(base)
    formats = ("wds", "ffcv") if ffcv_available() else ("wds",)
    opts = ConvertOptions(image=ImageOptions(max_side=max_side, mode="raw"), formats=formats, shard_size=8,
                          progress=False)
    convert(split_file_input("places_lt", tree.root, read_splits(tree.lists, 365)), base / "out", opts)
    return base / "out"
