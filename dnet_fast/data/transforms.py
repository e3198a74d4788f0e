"""Augmentation and eval transforms: batched tensor ops (CPU or GPU, static shapes) and a per-image PIL twin.

Both paths draw their random numbers from the same seeded ``torch.Generator`` for (seed, epoch, batch) through
:func:`draw_params`, so a batch is a pure function of those three numbers. The CIFAR-style transform is bit-identical
between the two paths; the ImageNet-style one uses the same crop boxes and flips but resamples differently
(``grid_sample`` bilinear versus PIL's antialiased bilinear). A ``policies.Recipe`` adds the stage-1 ops
(AutoAugment, RandAugment, ColorJitter, Cutout; ``augment``) after the crop and flip, on uint8 pixels; they are
PIL-exact, so a CIFAR recipe keeps the two paths bit-identical.

ImageNet-style eval is "resize the shorter side to R = round(256·crop/224), centre-crop R×R, centre-crop crop×crop"
(the two centre crops equal torchvision's one crop up to a one-pixel rounding difference); the resident loader stores
the R×R image, so its eval output equals the PIL path's bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dnet_fast.data.augment import apply_recipe, draw_recipe, pil_recipe
from dnet_fast.data.policies import Recipe

__all__ = [
    "CIFAR_PAD",
    "RRC_RATIO",
    "RRC_SCALE",
    "batch_generator",
    "center_crop_offset",
    "cifar_crop_flip",
    "draw_params",
    "eval_size",
    "eval_transform",
    "normalize",
    "pil_decode_resident",
    "pil_eval",
    "pil_resize_shorter",
    "pil_train",
    "pil_to_tensor",
    "random_resized_crop",
    "rrc_boxes",
    "train_transform",
]

CIFAR_PAD = 4  # zero padding of the CIFAR random crop, applied once (SPEC §13 #6)
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction range
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect-ratio range
_RRC_ATTEMPTS = 10  # as torchvision: tries before falling back to a centre crop


def batch_generator(seed: int, epoch: int, batch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by hashing (seed, epoch, batch, stream); CPU so draws match on every device."""
    words = np.random.SeedSequence([seed & (2**64 - 1), epoch, batch, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)


def eval_size(crop_size: int) -> int:
    """Side R the shorter image side is resized to before the eval centre crop (256 for 224)."""
    return round(crop_size * 256 / 224)


def center_crop_offset(size: int, crop: int) -> int:
    """Top/left offset of a centred crop (torchvision's rounding)."""
    return int(round((size - crop) / 2.0))


def draw_params(
    family: str, gen: torch.Generator, n: int, recipe: Recipe | None = None
) -> dict[str, torch.Tensor]:
    """The random numbers of one batch of ``n`` images (CPU tensors), in a fixed draw order.

    CIFAR: ``top``, ``left`` int64 in [0, 2·pad] and ``flip`` bool. ImageNet: the uniforms of the crop-box search
    (``area`` and ``logr`` (n, 10), ``ti``/``tj`` (n,)) and ``flip``. "none": nothing. An active ``recipe`` adds
    its draws (``augment.draw_recipe``) after these, so the crop and flip numbers do not depend on it.
    """
    params = _draw_crop_flip(family, gen, n)
    if recipe is not None and family != "none":
        params |= draw_recipe(recipe, gen, n)
    return params


def _draw_crop_flip(family: str, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    if family == "cifar":
        top = torch.randint(0, 2 * CIFAR_PAD + 1, (n,), generator=gen)
        left = torch.randint(0, 2 * CIFAR_PAD + 1, (n,), generator=gen)
        return {"top": top, "left": left, "flip": torch.rand(n, generator=gen) < 0.5}
    if family == "imagenet":
        area = torch.rand(n, _RRC_ATTEMPTS, generator=gen, dtype=torch.float64)
        logr = torch.rand(n, _RRC_ATTEMPTS, generator=gen, dtype=torch.float64)
        ti, tj = (
            torch.rand(n, generator=gen, dtype=torch.float64),
            torch.rand(n, generator=gen, dtype=torch.float64),
        )
        return {"area": area, "logr": logr, "ti": ti, "tj": tj, "flip": torch.rand(n, generator=gen) < 0.5}
    if family == "none":
        return {}
    msg = f"unknown augmentation '{family}'; valid: cifar, imagenet, none"
    raise ValueError(msg)


def rrc_boxes(params: dict[str, torch.Tensor], height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop boxes (torchvision's algorithm, vectorised over the batch).

    Args:
        params: from ``draw_params("imagenet", ...)``.
        height, width: (n,) int64 image sizes (may differ per image).

    Returns:
        (n, 4) int64 boxes ``(top, left, h, w)``.
    """
    hh, ww = height.double()[:, None], width.double()[:, None]  # (n, 1)
    target = hh * ww * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * params["area"])  # (n, 10)
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * params["logr"])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)  # (n, 10)
    first = ok.double().argmax(1, keepdim=True)  # first valid attempt (0 when none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # (n,)
    top = torch.floor(params["ti"] * (hh[:, 0] - h + 1))
    left = torch.floor(params["tj"] * (ww[:, 0] - w + 1))
    fb = _fallback_boxes(hh[:, 0], ww[:, 0])
    box = torch.stack([top, left, h, w], 1)
    return torch.where(ok.any(1, keepdim=True), box, fb).long()  # (n, 4)


def _fallback_boxes(hh: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
    """Centre crop with the aspect ratio clamped into RRC_RATIO (torchvision's fallback)."""
    ratio = ww / hh
    w = torch.where(ratio > RRC_RATIO[1], torch.round(hh * RRC_RATIO[1]), ww)
    h = torch.where(ratio < RRC_RATIO[0], torch.round(ww / RRC_RATIO[0]), hh)
    return torch.stack(
        [torch.div(hh - h, 2, rounding_mode="floor"), torch.div(ww - w, 2, rounding_mode="floor"), h, w], 1
    )


# ----------------------------------------------------------------------------------------------------------
# Batched tensor path: uint8 (B, H, W, 3) on any device in, float32 (B, 3, h, w) normalised out.


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x/255 − mean)/std for uint8 or 0..255 float (B, H, W, 3) input; returns contiguous float32 (B, 3, H, W).

    One output buffer: a single copy converts the dtype and the layout, then the arithmetic runs in place (the
    out-of-place form allocated five batch-sized tensors; allocating and first touching each one, not the maths,
    was most of its time). The operations and their order are those of the out-of-place form, so the values are
    bit-identical to it on every device.
    """
    b, h, w, _ = x.shape
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=x.device)
    out.copy_(x.permute(0, 3, 1, 2))  # (B, 3, H, W)
    return out.div_(255.0).sub_(m).div_(s)


def cifar_crop_flip(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Zero-pad by CIFAR_PAD, crop back to H×W at (top, left), mirror where ``flip``; uint8 (B, H, W, 3) → same."""
    b, h, w, _ = images.shape
    dev = images.device
    padded = F.pad(images, (0, 0, CIFAR_PAD, CIFAR_PAD, CIFAR_PAD, CIFAR_PAD))  # (B, H+8, W+8, 3)
    cols = torch.arange(w, device=dev)
    cols = torch.where(params["flip"].to(dev)[:, None], w - 1 - cols, cols)  # (B, W), mirrored per sample
    rows = params["top"].to(dev)[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = params["left"].to(dev)[:, None] + cols
    batch = torch.arange(b, device=dev)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)


def random_resized_crop(images: torch.Tensor, params: dict[str, torch.Tensor], crop: int) -> torch.Tensor:
    """Per-sample crop box resampled to crop×crop with one batched bilinear ``grid_sample``, then flip.

    Args:
        images: uint8 (B, H, W, 3).
        params: from ``draw_params("imagenet", ...)``.
        crop: output side.

    Returns:
        float32 (B, crop, crop, 3) in 0..255.
    """
    b, h, w, _ = images.shape
    sizes = torch.full((b,), h, dtype=torch.int64), torch.full((b,), w, dtype=torch.int64)
    box = rrc_boxes(params, *sizes).double()  # (B, 4) top, left, bh, bw
    top, left, bh, bw = box.unbind(1)
    sign = torch.where(params["flip"], -1.0, 1.0).double()
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    # Output pixel centres (normalised, align_corners=False) map onto the box: x = (bw/W)·xo + (2·left + bw)/W − 1.
    theta[:, 0, 0] = sign * bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    theta = theta.to(device=images.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [b, 3, crop, crop], align_corners=False)  # (B, crop, crop, 2)
    x = images.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)  # (B, crop, crop, 3)


def _center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    _, h, w, _ = images.shape
    top, left = center_crop_offset(h, crop), center_crop_offset(w, crop)
    return images[:, top : top + crop, left : left + crop]


def _resize_shorter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Tensor twin of :func:`pil_resize_shorter` (antialiased bilinear; not bit-equal to PIL)."""
    _, h, w, _ = images.shape
    oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (oh, ow) == (h, w):
        return images
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def eval_transform(
    images: torch.Tensor, family: str, crop_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Deterministic eval transform of a uint8 (B, H, W, 3) batch → float32 (B, 3, h, w).

    CIFAR: normalise only. ImageNet: resize shorter side to R (skipped for R×R input, as stored by the resident
    loader), centre-crop R×R, centre-crop ``crop_size``, normalise.
    """
    if family == "imagenet":
        r = eval_size(crop_size)
        images = _center_crop(_center_crop(_resize_shorter(images, r), r), crop_size)
    return normalize(images, mean, std)


def train_transform(
    images: torch.Tensor,
    family: str,
    params: dict[str, torch.Tensor],
    crop_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    recipe: Recipe | None = None,
) -> torch.Tensor:
    """Random augmentation of a uint8 (B, H, W, 3) batch → float32 (B, 3, h, w); "none" is the CIFAR eval.

    An active ``recipe`` runs on the uint8 crop (the ImageNet crop is rounded to uint8 first, as PIL's is) with
    the ``params`` of ``draw_params(..., recipe)``.
    """
    if family == "cifar":
        crop = cifar_crop_flip(images, params)  # (B, H, W, 3) uint8
    elif family == "imagenet":
        crop = random_resized_crop(images, params, crop_size)  # (B, crop, crop, 3) float32 in 0..255
    else:
        return eval_transform(images, "cifar", crop_size, mean, std)
    if recipe is not None and recipe.active:
        if crop.dtype != torch.uint8:
            crop = crop.round().clamp(0, 255).to(torch.uint8)
        crop = apply_recipe(crop, recipe, params)
    return normalize(crop, mean, std)


# ----------------------------------------------------------------------------------------------------------
# Per-image PIL path (naive loader): same semantics, uint8 (h, w, 3) out; normalisation happens batched.


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → uint8 (H, W, 3), the layout the batched ``normalize`` takes."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8, copy=True))


def pil_resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resizes so the shorter side is ``size`` (torchvision's truncation of the longer side), bilinear."""
    w, h = img.size
    ow, oh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if (ow, oh) == (w, h) else img.resize((ow, oh), Image.Resampling.BILINEAR)


def _pil_center_crop(img: Image.Image, crop: int) -> Image.Image:
    w, h = img.size
    top, left = center_crop_offset(h, crop), center_crop_offset(w, crop)
    return img.crop((left, top, left + crop, top + crop))


def pil_decode_resident(img: Image.Image, crop_size: int) -> Image.Image:
    """The R×R image the resident loader stores for a file (shorter side to R, centre crop)."""
    r = eval_size(crop_size)
    return _pil_center_crop(pil_resize_shorter(img, r), r)


def pil_eval(img: Image.Image, family: str, crop_size: int) -> torch.Tensor:
    """Eval transform of one image (before normalisation) → uint8 (h, w, 3)."""
    if family == "imagenet":
        img = _pil_center_crop(pil_decode_resident(img, crop_size), crop_size)
    return pil_to_tensor(img)


def pil_train(
    img: Image.Image,
    family: str,
    params: dict[str, torch.Tensor],
    row: int,
    crop_size: int,
    recipe: Recipe | None = None,
) -> torch.Tensor:
    """Augmentation of one image with row ``row`` of a batch's ``draw_params`` → uint8 (h, w, 3).

    An active ``recipe`` runs with PIL after the crop and flip (``augment.pil_recipe``).
    """
    if family == "cifar":
        w, h = img.size
        canvas = Image.new("RGB", (w + 2 * CIFAR_PAD, h + 2 * CIFAR_PAD))  # black = zero padding
        canvas.paste(img, (CIFAR_PAD, CIFAR_PAD))
        top, left = int(params["top"][row]), int(params["left"][row])
        img = canvas.crop((left, top, left + w, top + h))
    elif family == "imagenet":
        one = {k: v[row : row + 1] for k, v in params.items()}
        top, left, bh, bw = rrc_boxes(one, torch.tensor([img.height]), torch.tensor([img.width]))[0].tolist()
        img = img.resize(
            (crop_size, crop_size), Image.Resampling.BILINEAR, box=(left, top, left + bw, top + bh)
        )
    else:
        return pil_eval(img, "cifar", crop_size)
    if bool(params["flip"][row]):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if recipe is not None:
        img = pil_recipe(img, recipe, params, row)
    return pil_to_tensor(img)
