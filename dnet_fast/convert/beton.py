"""FFCV ``.beton`` writing from converted tar shards (optional: needs ffcv), storing the shards' JPEG bytes as-is."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dnet_fast.atomic import atomic_path
from dnet_fast.convert.images import ImageOptions, decode_payload
from dnet_fast.shardformat import ShardReader

__all__ = ["ffcv_available", "write_beton"]

_MIN_PAGE = 1 << 23  # FFCV's default 8 MiB page; a sample must fit in one page (libffcv/ffcv #135)


def ffcv_available() -> bool:
    """Whether ffcv can be imported."""
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Jpeg:
    """Already-encoded JPEG bytes of an ``height`` × ``width`` image (stored without re-encoding)."""

    data: bytes
    height: int
    width: int


class _BetonSource:
    """The indexed dataset FFCV's writer reads: (image, label) per sample, from the tar shards.

    JPEG samples are passed through as bytes (identical to what the DALI loader decodes); PNG samples (raw mode)
    are decoded to pixels; in ``proportion`` mode a seeded hash of the index picks raw for a fraction of them.
    """

    def __init__(self, tars: list[Path], labels: np.ndarray, opts: ImageOptions, raw_fraction: float) -> None:
        self.reader = ShardReader(tars)
        self.labels = labels
        self.opts = opts
        self.raw_fraction = raw_fraction

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[object, int]:
        data = self.reader.image_bytes(i)
        label = int(self.labels[i])
        if self.reader.ext(i) != "jpg" or self._store_raw(i):
            return decode_payload(data), label
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
        return _Jpeg(data, h, w), label

    def _store_raw(self, i: int) -> bool:
        if self.opts.mode != "proportion":
            return False
        # A hash, not np.random (FFCV's own 'proportion' draw is unseeded): re-runs write identical files.
        u = int.from_bytes(hashlib.blake2b(b"%d" % i, digest_size=8).digest(), "little") / 2**64
        return u < self.raw_fraction


def _precoded_field_class() -> type:
    from ffcv.fields import RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    class PrecodedRGBImageField(RGBImageField):
        """RGBImageField that also accepts ``_Jpeg`` bytes and stores them without re-encoding."""

        def encode(self, destination, image, malloc):  # type: ignore[override]
            if not isinstance(image, _Jpeg):
                return super().encode(destination, image, malloc)
            destination["mode"] = IMAGE_MODES["jpg"]
            destination["height"], destination["width"] = image.height, image.width
            arr = np.frombuffer(image.data, dtype=np.uint8)
            destination["data_ptr"], storage = malloc(arr.nbytes)
            storage[:] = arr
            return None

    return PrecodedRGBImageField


def write_beton(
    tars: list[Path],
    labels: np.ndarray,
    out_path: str | Path,
    opts: ImageOptions,
    workers: int = 1,
    raw_fraction: float = 0.5,
) -> None:
    """Writes ``out_path`` (an ``image`` RGBImageField and a ``label`` IntField) atomically.

    Args:
        tars: the split's tar shards (already validated images).
        labels: (N,) class ids in sample order.
        out_path: the ``.beton`` to create; written as ``.tmp`` and renamed when complete.
        opts: storage options (mode ``raw`` stores pixels, ``jpg`` the shards' JPEG bytes).
        workers: FFCV writer processes.
        raw_fraction: share of raw samples in ``proportion`` mode.
    """
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    source = _BetonSource(list(tars), np.asarray(labels), opts, raw_fraction)
    field_cls = _precoded_field_class()
    image_field = field_cls(
        write_mode="raw" if opts.mode == "raw" else "jpg", max_resolution=None, jpeg_quality=opts.quality
    )
    fields = {"image": image_field, "label": IntField()}
    with atomic_path(out_path) as tmp:
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(source), num_workers=max(1, workers))
        writer.from_indexed_dataset(source, chunksize=64)
        _set_type_id(tmp, 0, _rgb_type_id())


def _page_size(source: _BetonSource) -> int:
    # Raw samples take H·W·3 bytes; the largest must fit in one page, and pages are powers of two.
    largest = max((h * w * 3 for h, w in _sizes(source)), default=0)
    page = _MIN_PAGE
    while page < 2 * largest:
        page *= 2
    return page


def _sizes(source: _BetonSource) -> list[tuple[int, int]]:
    if source.opts.max_side > 0:
        return [(source.opts.max_side, source.opts.max_side)]
    out = []
    for i in range(len(source)):
        with Image.open(io.BytesIO(source.reader.image_bytes(i))) as img:
            out.append(img.size)
    return out


def _rgb_type_id() -> int:
    from ffcv.fields import RGBImageField
    from ffcv.types import TYPE_ID_HANDLER

    return next(k for k, v in TYPE_ID_HANDLER.items() if v is RGBImageField)


def _set_type_id(path: Path, field_index: int, type_id: int) -> None:
    # FFCV records a subclass as "unknown field" (type id 255); the stored bytes are plain RGBImageField data,
    # so the descriptor is set to RGBImageField's id and any FFCV reader opens the file without custom fields.
    from ffcv.types import FieldDescType, HeaderType

    offset = HeaderType.itemsize + field_index * FieldDescType.itemsize + FieldDescType.fields["type_id"][1]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([type_id]))
