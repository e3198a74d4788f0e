"""The AutoAugment / RandAugment / ColorJitter pixel ops: batched uint8 tensor versions and their PIL twins.

Every op exists twice under one name in ``OPS``: ``batched`` transforms a uint8 (k, H, W, 3) batch on any device,
each image with its own argument; ``pil`` is the PIL call that defines the op (``ImageOps``, ``ImageEnhance``,
``Image.transform`` / ``rotate``, as in timm and DeepVoltaire/AutoAugment). The batched versions redo PIL's
arithmetic, so they return PIL's pixels exactly (tests/test_augment_ops.py):

- Invert, Posterize, Solarize, SolarizeAdd, AutoContrast, Equalize build PIL's lookup tables;
- Brightness, Color, Contrast, Sharpness use PIL's float32 blend (``ImagingBlend`` truncates in1 + α·(in2 − in1))
  against PIL's degenerate images: black; grey L = (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16; the constant
  ⌊mean(L) + ½⌋; SMOOTH = round(Σ [1 1 1; 1 5 1; 1 1 1]·p / 13) inside a one-pixel border that keeps the input;
- ShearX/Y, TranslateX/Y, Rotate go through ``warp.warp_affine`` (PIL's bilinear / bicubic affine transform).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance, ImageOps

from dnet_fast.data.warp import affine_matrix, to_device, warp_affine
from dnet_fast.registry import Registry

__all__ = [
    "OPS",
    "AugOp",
    "blend",
    "grey_levels",
]

Fill = tuple[int, int, int]
Batched = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Fill], torch.Tensor]
Pil = Callable[[Image.Image, float, bool, Fill], Image.Image]


@dataclass(frozen=True, slots=True)
class AugOp:
    """One named op.

    Attributes:
        batched: ``(x uint8 (k, H, W, 3), arg float64 (k,) CPU, bicubic bool (k,) CPU, fill) → uint8 (k, H, W, 3)``.
        pil: ``(image, arg, bicubic, fill) → image``, the PIL definition of the op.
    """

    batched: Batched
    pil: Pil


OPS: Registry[AugOp] = Registry("augmentation op")


def _register(name: str, batched: Batched, pil: Pil) -> None:
    OPS.register(name)(AugOp(batched, pil))


def _per_image(arg: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(k,) CPU argument → (k, 1, 1, 1) on x's device, to broadcast over an image."""
    return to_device(arg, x, dtype).view(-1, 1, 1, 1)


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Applies per-image tables: x uint8 (k, H, W, 3), lut (k, 3, 256) or (k, 1, 256) levels → uint8 (k, H, W, 3)."""
    k = x.shape[0]
    table = lut.expand(k, 3, 256).to(torch.uint8).reshape(-1)  # (k·3·256,)
    base = (torch.arange(k * 3, device=x.device) * 256).view(k, 1, 1, 3)
    # One flat lookup per pixel and channel; the in-place add avoids a broadcast copy.
    return table.take(x.long().add_(base))


def _levels(x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.arange(256, device=x.device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Histogram and lookup-table ops


def _invert(x: torch.Tensor, _arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    return 255 - x


def _posterize(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    bits = arg.long().clamp(0, 8)
    mask = (255 - (2 ** (8 - bits) - 1)).to(torch.uint8)  # keep the top ``bits`` bits; 0 bits → black
    return x & _per_image(mask, x, torch.uint8)


def _solarize(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    levels = _levels(x, torch.float64)
    thresh = to_device(arg, x, torch.float64).view(-1, 1, 1)  # float thresholds compare as in PIL
    return _lut(x, torch.where(levels < thresh, levels, 255 - levels))  # PIL: i < threshold ? i : 255 − i


def _solarize_add(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    # timm's solarize_add: levels below 128 get + add (saturated at 255), the others stay.
    levels = _levels(x)
    add = to_device(arg, x, torch.int64).view(-1, 1, 1)
    return _lut(x, torch.where(levels < 128, (levels + add).clamp(max=255), levels))


def _autocontrast(x: torch.Tensor, _arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    lo, hi = torch.aminmax(x.flatten(1, 2), dim=1)  # (k, 3) per channel
    lo, hi = lo.double()[..., None], hi.double()[..., None]  # (k, 3, 1)
    span = (hi - lo).clamp(min=1)
    scale = torch.full_like(span, 255.0) / span  # not 255.0 / span: torch computes that as 255·(1/span)
    offset = -lo * scale
    levels = _levels(x, torch.float64)
    lut = (levels * scale + offset).trunc().clamp(0, 255)  # PIL: int(ix·scale + offset), clipped
    return _lut(x, torch.where(hi > lo, lut, levels))  # a flat channel keeps the identity


def _equalize(x: torch.Tensor, _arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    k, h, w, _ = x.shape
    base = (torch.arange(k * 3, device=x.device) * 256).view(k, 1, 1, 3)
    idx = x.long().add_(base).view(-1)
    # scatter_add_ into a fixed size, not bincount: CUDA's bincount reads the maximum back to size its output.
    hist = torch.zeros(k * 3 * 256, dtype=torch.int64, device=x.device).scatter_add_(
        0, idx, torch.ones_like(idx)
    )
    hist = hist.view(k, 3, 256)
    levels = _levels(x)
    present = hist > 0
    last = hist.gather(2, (levels * present).argmax(2, keepdim=True))  # count of the highest present level
    step = (h * w - last) // 255  # (k, 3, 1)
    before = hist.cumsum(2) - hist  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)  # PIL's point() saturates at 255
    keep = (present.sum(2, keepdim=True) <= 1) | (step == 0)
    return _lut(x, torch.where(keep, levels, lut))


def _pil_posterize(img: Image.Image, arg: float, _bicubic: bool, _fill: Fill) -> Image.Image:
    bits = int(arg)
    if bits >= 8:
        return img  # timm's posterize: identity at 8 bits
    if bits <= 0:
        return Image.new(img.mode, img.size)  # keeping 0 bits is black (Pillow >= 10 rejects bits=0)
    return ImageOps.posterize(img, bits)


def _pil_solarize_add(img: Image.Image, arg: float, _bicubic: bool, _fill: Fill) -> Image.Image:
    add = int(arg)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


_register("Invert", _invert, lambda img, *_: ImageOps.invert(img))
_register("Posterize", _posterize, _pil_posterize)
_register("Solarize", _solarize, lambda img, arg, *_: ImageOps.solarize(img, arg))
_register("SolarizeAdd", _solarize_add, _pil_solarize_add)
_register("AutoContrast", _autocontrast, lambda img, *_: ImageOps.autocontrast(img))
_register("Equalize", _equalize, lambda img, *_: ImageOps.equalize(img))


# ----------------------------------------------------------------------------------------------------------
# Enhance ops: PIL blends a degenerate image with the input


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: trunc(clip(d + f·(x − d))) in float32; uint8 (k, H, W, 3) out.

    Args:
        degenerate: uint8 or int tensor broadcastable to x.
        x: uint8 (k, H, W, 3).
        factor: float64 (k,) CPU; rounded to float32 like PIL's C argument.
    """
    f = _per_image(factor.float(), x, torch.float32)
    return _blend_f32(degenerate.to(torch.float32), x.to(torch.float32), f).to(torch.uint8)


def _blend_f32(d: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """ImagingBlend's arithmetic on float32 operands: (float)(in1 + α·(in2 − in1)), clipped, truncated."""
    return (d + f * (x - d)).clamp_(0, 255).trunc_()


def grey_levels(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L conversion: int32 (k, H, W) from uint8 (k, H, W, 3) (ITU-R 601-2 luma in 16-bit fixed point)."""
    c = x.to(torch.int32)
    return (c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 0x8000) >> 16


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH: the 1-pixel border keeps the input, the inside is round(Σ w·p / 13)."""
    c = x.to(torch.int16)  # Σ w·p <= 13·255 fits
    rows = c[:, :, :-2] + c[:, :, 1:-1] + c[:, :, 2:]  # the 3×3 box sum, separably
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    out = c.clone()
    out[:, 1:-1, 1:-1] = (
        box + 4 * c[:, 1:-1, 1:-1] + 6
    ) // 13  # centre weight 5; Σ/13 is never exactly ½ off
    return out


def _blend_lut(x: torch.Tensor, centre: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``blend`` with a per-image constant degenerate image, as a table: each level goes through the same
    float32 operations as in ``blend``, so the result is identical, at the cost of one lookup per value."""
    d = to_device(centre, x, torch.float32).view(-1, 1, 1)  # (k, 1, 1)
    f = to_device(factor, x, torch.float32).view(-1, 1, 1)
    return _lut(x, _blend_f32(d, _levels(x, torch.float32).view(1, 1, 256), f).long())  # (k, 1, 256)


def _brightness(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    return _blend_lut(x, torch.zeros(len(x), device=x.device), arg)  # PIL's degenerate image is black


def _color(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    return blend(grey_levels(x)[..., None], x, arg)


def _contrast(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    grey = grey_levels(x)
    mean = grey.sum(dim=(1, 2), dtype=torch.int64).double() / (grey.shape[1] * grey.shape[2])
    return _blend_lut(x, torch.floor(mean + 0.5), arg)  # ImageStat mean, int(mean + 0.5)


def _sharpness(x: torch.Tensor, arg: torch.Tensor, _bicubic: torch.Tensor, _fill: Fill) -> torch.Tensor:
    return blend(_smooth(x), x, arg)


_register("Brightness", _brightness, lambda img, arg, *_: ImageEnhance.Brightness(img).enhance(arg))
_register("Color", _color, lambda img, arg, *_: ImageEnhance.Color(img).enhance(arg))
_register("Contrast", _contrast, lambda img, arg, *_: ImageEnhance.Contrast(img).enhance(arg))
_register("Sharpness", _sharpness, lambda img, arg, *_: ImageEnhance.Sharpness(img).enhance(arg))


# ----------------------------------------------------------------------------------------------------------
# Geometric ops


def _geometric(name: str) -> Batched:
    def apply(x: torch.Tensor, arg: torch.Tensor, bicubic: torch.Tensor, fill: Fill) -> torch.Tensor:
        _, h, w, _ = x.shape
        # Python doubles, as PIL computes its matrices (math.cos/sin for Rotate), once per image on the CPU.
        mats = torch.tensor([affine_matrix(name, a, h, w) for a in arg.tolist()], dtype=torch.float64)
        return warp_affine(x, mats.view(-1, 6), bicubic, fill)

    return apply


def _resample(bicubic: bool) -> Image.Resampling:
    return Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR


def _pil_affine(name: str) -> Pil:
    def apply(img: Image.Image, arg: float, bicubic: bool, fill: Fill) -> Image.Image:
        data = affine_matrix(name, arg, img.height, img.width)
        return img.transform(img.size, Image.Transform.AFFINE, data, _resample(bicubic), fillcolor=fill)

    return apply


def _pil_rotate(img: Image.Image, arg: float, bicubic: bool, fill: Fill) -> Image.Image:
    return img.rotate(arg, _resample(bicubic), fillcolor=fill)


for _name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
    _register(_name, _geometric(_name), _pil_affine(_name))
_register("Rotate", _geometric("Rotate"), _pil_rotate)
