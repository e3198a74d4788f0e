"""Image checks and canonical encoding: decode, repair (CMYK, grayscale, wrong extension), bound, re-encode."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "BadImage",
    "ImageOptions",
    "Prepared",
    "decode_payload",
    "prepare_array",
    "prepare_bytes",
    "prepare_file",
]

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_VERY_LARGE_PIXELS = 16_000_000  # above this a source is noted in the report (it is still converted)
_EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """An image that cannot be converted; ``kind`` is a Problem kind, ``str()`` the detail."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Workers send it back through a pipe; the default Exception pickling would drop ``kind``.
        return BadImage, (self.kind, str(self))


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored.

    Attributes:
        max_side: longest side in px after conversion (0 keeps the source size); smaller images stay as they are.
        mode: ``jpg`` (JPEG everywhere), ``raw`` (lossless: raw pixels in FFCV, PNG in the tar shards) or
            ``proportion`` (JPEG in the shards; FFCV stores a seeded fraction raw).
        quality: JPEG quality of re-encoded images.
        max_pixels: sources with more pixels are rejected as ``too_large`` (decompression-bomb guard).
        strict: treat repairable sources (CMYK, grayscale, wrong extension, very large) as bad input.
    """

    max_side: int = 256
    mode: str = "jpg"
    quality: int = 90
    max_pixels: int = 178_956_970  # Pillow's hard decompression-bomb limit (2 × MAX_IMAGE_PIXELS)
    strict: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("jpg", "raw", "proportion"):
            msg = f"image mode must be jpg | raw | proportion, got '{self.mode}'"
            raise ValueError(msg)
        if self.max_side < 0 or not 1 <= self.quality <= 100:
            msg = f"need max_side >= 0 and 1 <= quality <= 100, got {self.max_side}, {self.quality}"
            raise ValueError(msg)

    @property
    def ext(self) -> str:
        """Extension of the stored image in the tar shards."""
        return "png" if self.mode == "raw" else "jpg"


@dataclass(frozen=True)
class Prepared:
    """A converted image: encoded bytes (``ext``) of a ``height`` × ``width`` RGB image plus repair notes."""

    data: bytes
    ext: str
    height: int
    width: int
    notes: tuple[str, ...] = ()


def prepare_file(path: str | Path, opts: ImageOptions) -> Prepared:
    """Reads, checks and canonicalises one image file.

    Raises:
        BadImage: missing, empty, undecodable/truncated, too large, or (``strict``) in need of repair.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImage("missing", f"no such file: {path}")
    data = path.read_bytes()
    if not data:
        raise BadImage("empty", f"0-byte file: {path}")
    return prepare_bytes(data, opts, suffix=path.suffix.lower())


def prepare_bytes(data: bytes, opts: ImageOptions, suffix: str = "") -> Prepared:
    """Canonicalises encoded image bytes (see ``prepare_file``); ``suffix`` is the source file's extension."""
    notes: list[str] = []
    is_jpeg = data.startswith(_JPEG_MAGIC)
    if suffix in (".jpg", ".jpeg") and not is_jpeg:
        fmt = "PNG" if data.startswith(_PNG_MAGIC) else "non-JPEG"
        notes.append(f"wrong_extension: {fmt} data under a {suffix} name")
    img = _open(data, opts)
    w, h = img.size
    if w * h > _VERY_LARGE_PIXELS:
        notes.append(f"very_large: {w}x{h} source")
    target = _target_size(w, h, opts.max_side)
    if is_jpeg and target != (w, h):
        img.draft("RGB", target)  # DCT-domain downscale: decodes a huge JPEG at 1/2..1/8 size, fast
    _load(img)
    if img.mode != "RGB":
        notes.append(f"{'cmyk' if img.mode == 'CMYK' else 'converted_mode'}: {img.mode} -> RGB")
        img = img.convert("RGB")
    if opts.strict and notes:
        raise BadImage(notes[0].split(":", 1)[0], "; ".join(notes) + " (--strict)")
    if img.size != target:
        img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=None)
    keep = is_jpeg and not notes and target == (w, h) and opts.ext == "jpg" and not _rotated(img)
    payload = data if keep else _encode(img, opts)
    return Prepared(payload, opts.ext, img.size[1], img.size[0], tuple(notes))


def prepare_array(image: np.ndarray, opts: ImageOptions) -> Prepared:
    """Canonicalises a decoded uint8 (H, W, 3) RGB array (CIFAR); lossless when ``opts.mode == 'raw'``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadImage("corrupt", f"expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    img = Image.fromarray(image, "RGB")
    target = _target_size(img.size[0], img.size[1], opts.max_side)
    if img.size != target:
        img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=None)
    return Prepared(_encode(img, opts), opts.ext, img.size[1], img.size[0])


def decode_payload(data: bytes) -> np.ndarray:
    """Decodes stored bytes (JPEG or PNG) to uint8 (H, W, 3) RGB with Pillow."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _open(data: bytes, opts: ImageOptions) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 Mpx; our own max_pixels check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadImage("too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise BadImage("corrupt", f"cannot identify image: {err}") from None
    w, h = img.size
    if w * h > opts.max_pixels:
        raise BadImage("too_large", f"{w}x{h} = {w * h} px exceeds max_pixels={opts.max_pixels}")
    if w < 1 or h < 1:
        raise BadImage("corrupt", f"image has size {w}x{h}")
    return img


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # Pillow raises "image file is truncated" for cut-off JPEGs and broken data streams.
        raise BadImage("corrupt", f"cannot decode: {err}") from None


def _target_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    # FFCV's resizer convention: scale so the longer side is max_side, floor both sides, never upscale.
    if max_side <= 0 or max(w, h) <= max_side:
        return w, h
    ratio = max_side / max(w, h)
    return max(1, int(w * ratio)), max(1, int(h * ratio))


def _rotated(img: Image.Image) -> bool:
    # DALI honours EXIF orientation, Pillow and FFCV do not: such JPEGs are re-encoded without EXIF.
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
    except (OSError, ValueError, SyntaxError):
        return True


def _encode(img: Image.Image, opts: ImageOptions) -> bytes:
    buf = io.BytesIO()
    if opts.ext == "png":
        img.save(buf, format="PNG", compress_level=1)  # lossless; level 1: fast, still ~2x smaller than raw
    else:
        img.save(buf, format="JPEG", quality=opts.quality)
    return buf.getvalue()
