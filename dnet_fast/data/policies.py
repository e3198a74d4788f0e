"""Stage-1 augmentation recipes: the ``Recipe`` selection, the AutoAugment CIFAR-10 table, timm's RandAugment spec.

The recipes of SPEC §6.1–§6.3 add, after the random crop and flip: ColorJitter → RandAugment → AutoAugment →
Cutout (each optional, in that order, as in the official transforms). This module owns the *numbers*: the policy
tables and the magnitude → argument functions. ``augment_ops`` owns the pixel operations, ``augment`` the random
draws and the batched / per-image application.

AutoAugment (Cubuk et al. 2019, "policy learned on reduced CIFAR-10"): one of 25 sub-policies per image, each of
its two ops applied with its probability at its magnitude bin 0..9; bins map onto the ranges of the paper's
Appendix (as in DeepVoltaire/AutoAugment ``SubPolicy``): shear [0, 0.3], translate [0, 150/331]·size, rotate
[0°, 30°] and enhance factors 1 ± [0, 0.9], each with a random sign; posterize 8 → 4 bits; solarize threshold
256 → 0. The official Difficulty-Net ``CIFAR-LT/auto_augment.py`` (4uiiurz1's port) lists the same 25
sub-policies (its "Invert, 0, 0.3" is the paper's never-applied "Invert, 0.0, 3") but maps bin m to a uniform draw
in ``linspace(lo, hi, 11)[m : m + 2]`` over the *signed* range (bin 8 of shear is always positive, bin 5 about
zero) and resamples with scipy's cubic spline. dnet-fast keeps the paper's magnitudes and takes the rest of the
official geometry: geometric ops fill with 0 (scipy's ``cval=0``) and interpolate cubically (PIL BICUBIC; PIL has
no spline).

RandAugment (timm ``rand-n2-m10-mstd0.5``, the official ImageNet-LT transform): n ops drawn with replacement from
timm's 15 ``_RAND_TRANSFORMS``, each applied with probability p = 0.5 at magnitude N(m, mstd) clipped to
[0, mmax = 10], geometric ops resampled with a random choice of bilinear / bicubic and filled with
``RAND_FILL``. The official code passes ``translate_const = int(224·0.45) = 100``, but timm's RandAugment list
uses the *relative* translations (``TranslateXRel``: 0.45·size, 100.8 px at 224), so the constant is unused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "AUTOAUGMENT_BINS",
    "AUTOAUGMENT_FILL",
    "AUTOAUGMENT_POLICIES",
    "CIFAR10_POLICY",
    "COLOR_JITTER_OPS",
    "RAND_FILL",
    "RAND_LEVEL_DENOM",
    "RAND_OPS",
    "RAND_TRANSFORMS",
    "PolicyOp",
    "RandAugmentSpec",
    "Recipe",
    "autoaugment_arg",
    "parse_randaugment",
    "randaugment_arg",
]

AUTOAUGMENT_BINS = 10  # magnitude bins 0..9 of the AutoAugment paper
AUTOAUGMENT_FILL = (0, 0, 0)  # the official CIFAR AutoAugment pads geometric ops with 0 (scipy cval)
# timm's img_mean hparam for the ImageNet mean, tuple(min(255, round(255·m))), as the official code passes it.
RAND_FILL = (124, 116, 104)
RAND_LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is an op's full strength
COLOR_JITTER_OPS = ("Brightness", "Contrast", "Color")  # torchvision's brightness, contrast, saturation (PIL)


@dataclass(frozen=True, slots=True)
class PolicyOp:
    """One op of an AutoAugment sub-policy: applied with probability ``prob`` at magnitude bin ``bin``."""

    name: str
    prob: float
    bin: int


def _sub(n1: str, p1: float, m1: int, n2: str, p2: float, m2: int) -> tuple[PolicyOp, PolicyOp]:
    return PolicyOp(n1, p1, m1), PolicyOp(n2, p2, m2)


# The 25 sub-policies learned on reduced CIFAR-10 (AutoAugment paper, Appendix Table), in the paper's order.
CIFAR10_POLICY: tuple[tuple[PolicyOp, PolicyOp], ...] = (
    _sub("Invert", 0.1, 7, "Contrast", 0.2, 6),
    _sub("Rotate", 0.7, 2, "TranslateX", 0.3, 9),
    _sub("Sharpness", 0.8, 1, "Sharpness", 0.9, 3),
    _sub("ShearY", 0.5, 8, "TranslateY", 0.7, 9),
    _sub("AutoContrast", 0.5, 8, "Equalize", 0.9, 2),
    _sub("ShearY", 0.2, 7, "Posterize", 0.3, 7),
    _sub("Color", 0.4, 3, "Brightness", 0.6, 7),
    _sub("Sharpness", 0.3, 9, "Brightness", 0.7, 9),
    _sub("Equalize", 0.6, 5, "Equalize", 0.5, 1),
    _sub("Contrast", 0.6, 7, "Sharpness", 0.6, 5),
    _sub("Color", 0.7, 7, "TranslateX", 0.5, 8),
    _sub("Equalize", 0.3, 7, "AutoContrast", 0.4, 8),
    _sub("TranslateY", 0.4, 3, "Sharpness", 0.2, 6),
    _sub("Brightness", 0.9, 6, "Color", 0.2, 8),
    _sub("Solarize", 0.5, 2, "Invert", 0.0, 3),
    _sub("Equalize", 0.2, 0, "AutoContrast", 0.6, 0),
    _sub("Equalize", 0.2, 8, "Equalize", 0.6, 4),
    _sub("Color", 0.9, 9, "Equalize", 0.6, 6),
    _sub("AutoContrast", 0.8, 4, "Solarize", 0.2, 8),
    _sub("Brightness", 0.1, 3, "Color", 0.7, 0),
    _sub("Solarize", 0.4, 5, "AutoContrast", 0.9, 3),
    _sub("TranslateY", 0.9, 9, "TranslateY", 0.7, 9),
    _sub("AutoContrast", 0.9, 2, "Solarize", 0.8, 3),
    _sub("Equalize", 0.8, 8, "Invert", 0.1, 3),
    _sub("TranslateY", 0.7, 9, "AutoContrast", 0.9, 1),
)

AUTOAUGMENT_POLICIES = {"cifar10": CIFAR10_POLICY}

# Paper ranges over the 10 bins: (first, last, random sign); the value is linspace(first, last, 10)[bin].
_AA_RANGES = {
    "ShearX": (0.0, 0.3, True),
    "ShearY": (0.0, 0.3, True),
    "TranslateX": (0.0, 150 / 331, True),
    "TranslateY": (0.0, 150 / 331, True),
    "Rotate": (0.0, 30.0, True),
    "Color": (0.0, 0.9, True),
    "Contrast": (0.0, 0.9, True),
    "Sharpness": (0.0, 0.9, True),
    "Brightness": (0.0, 0.9, True),
    "Posterize": (8.0, 4.0, False),
    "Solarize": (256.0, 0.0, False),
}
_ENHANCE = frozenset({"Color", "Contrast", "Sharpness", "Brightness"})


def autoaugment_arg(
    name: str, bins: torch.Tensor, negate: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The op argument of AutoAugment op ``name`` at magnitude ``bins`` (int64 (k,)) → float64 (k,).

    Enhance ops: factor 1 ± v; shear: ±v; rotate: ±v degrees; translate: ±v·size pixels; posterize: bits
    round(v); solarize: threshold v; ops without a magnitude: 0. ``negate`` (bool (k,)) picks the sign.
    """
    if name not in _AA_RANGES:
        return torch.zeros(len(bins), dtype=torch.float64)
    first, last, signed = _AA_RANGES[name]
    v = torch.from_numpy(np.linspace(first, last, AUTOAUGMENT_BINS))[bins]  # (k,) float64
    sign = torch.where(negate, -1.0, 1.0).double() if signed else torch.ones_like(v)
    if name in _ENHANCE:
        return 1 + v * sign
    if name == "TranslateX":
        return v * width * sign
    if name == "TranslateY":
        return v * height * sign
    if name == "Posterize":
        return torch.round(v)
    return v * sign


# timm's RandAugment list (timm/data/auto_augment.py ``_RAND_TRANSFORMS``) → the op each name runs.
RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_OPS = {
    name: name.removesuffix("Rel") for name in RAND_TRANSFORMS
}  # TranslateXRel runs TranslateX (pixels)


def randaugment_arg(
    name: str, level: torch.Tensor, negate: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """timm's ``LEVEL_TO_ARG[name]`` at magnitude ``level`` (float64 (k,), already clipped) → float64 (k,).

    Written with the operations of timm's functions in their order, so the float64 values are the ones timm
    computes in Python doubles; relative translations are converted to pixels (``pct · size``) as timm's
    ``translate_x_rel`` does.
    """
    frac = level / RAND_LEVEL_DENOM
    sign = torch.where(negate, -1.0, 1.0).double()
    if name == "Rotate":
        return frac * 30.0 * sign
    if name in _ENHANCE:
        return frac * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return frac * 0.3 * sign
    if name == "TranslateXRel":
        return frac * 0.45 * sign * width
    if name == "TranslateYRel":
        return frac * 0.45 * sign * height
    if name == "Posterize":
        return torch.trunc(frac * 4)
    if name == "Solarize":
        return torch.trunc(frac * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.trunc(frac * 110).clamp(max=128)
    return torch.zeros_like(level)


@dataclass(frozen=True, slots=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (``rand-n2-m10-mstd0.5``).

    Attributes:
        n: ops per image (``n``, default 2).
        m: magnitude 0..mmax (``m``, default 10).
        mstd: std of the Gaussian magnitude noise (``mstd``, default 0: fixed magnitude).
        p: probability of applying each drawn op (``p``, default 0.5).
        mmax: upper clip of the magnitude (``mmax``, default 10).
    """

    n: int = 2
    m: float = 10.0
    mstd: float = 0.0
    p: float = 0.5
    mmax: float = RAND_LEVEL_DENOM


_RA_KEYS = {"n": int, "m": int, "mstd": float, "p": float, "mmax": int}


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """Parses timm's RandAugment config string; raises ValueError naming the section it cannot accept.

    Supported sections: ``n`` (int), ``m`` (int), ``mstd`` (float ≤ 100), ``p`` (float), ``mmax`` (int). timm's
    ``inc``, ``t`` and uniform magnitudes (``mstd`` > 100) are not implemented.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        msg = f"RandAugment spec '{spec}' must start with 'rand', got '{parts[0]}'"
        raise ValueError(msg)
    values: dict[str, float] = {}
    for part in parts[1:]:
        found = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if found is None or found.group(1) not in _RA_KEYS:
            msg = f"RandAugment spec '{spec}': unsupported section '{part}' (valid: {', '.join(_RA_KEYS)})"
            raise ValueError(msg)
        key, raw = found.groups()
        try:
            values[key] = _RA_KEYS[key](raw)
        except ValueError:
            msg = f"RandAugment spec '{spec}': section '{part}' needs a {_RA_KEYS[key].__name__} value"
            raise ValueError(msg) from None
    out = RandAugmentSpec(**{k: float(v) if k != "n" else int(v) for k, v in values.items()})
    if out.n < 1 or not 0 <= out.p <= 1 or not 0 <= out.mstd <= 100 or out.mmax <= 0:
        msg = f"RandAugment spec '{spec}': need n >= 1, 0 <= p <= 1, 0 <= mstd <= 100, mmax > 0; got {out}"
        raise ValueError(msg)
    return out


@dataclass(frozen=True, slots=True)
class Recipe:
    """The stage-1 augmentation ops a training loader adds after its crop and flip (default: none).

    Applied in the official order ColorJitter → RandAugment → AutoAugment → Cutout on uint8 pixels, before
    normalisation. Presets: CIFAR ``Recipe(autoaugment="cifar10", cutout=16)``; ImageNet-LT
    ``Recipe(color_jitter=0.4, randaugment="rand-n2-m10-mstd0.5")``; Places-LT ``Recipe(color_jitter=0.4)``.

    Attributes:
        autoaugment: AutoAugment policy name ("" = off; "cifar10").
        randaugment: timm RandAugment spec ("" = off), e.g. "rand-n2-m10-mstd0.5".
        color_jitter: torchvision ColorJitter(j, j, j, 0) strength: brightness, contrast and saturation factors
            uniform in [max(0, 1 − j), 1 + j], applied in a random order per image (0 = off).
        cutout: side in pixels of the Cutout square (centre uniform over the image, clipped at the border,
            filled with the image's mean grey level as in the official code; 0 = off).
    """

    autoaugment: str = ""
    randaugment: str = ""
    color_jitter: float = 0.0
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.autoaugment and self.autoaugment not in AUTOAUGMENT_POLICIES:
            msg = f"Recipe.autoaugment must be '' or one of {sorted(AUTOAUGMENT_POLICIES)}, got '{self.autoaugment}'"
            raise ValueError(msg)
        if self.randaugment:
            parse_randaugment(self.randaugment)
        if not (math.isfinite(self.color_jitter) and self.color_jitter >= 0):
            msg = f"Recipe.color_jitter must be a finite number >= 0, got {self.color_jitter}"
            raise ValueError(msg)
        if isinstance(self.cutout, bool) or not isinstance(self.cutout, int) or self.cutout < 0:
            msg = f"Recipe.cutout must be an int >= 0 (pixels), got {self.cutout!r}"
            raise ValueError(msg)

    @property
    def active(self) -> bool:
        """Whether any op is on (an inactive recipe leaves every loader's output unchanged)."""
        return bool(self.autoaugment or self.randaugment or self.color_jitter or self.cutout)

    @property
    def rand(self) -> RandAugmentSpec | None:
        """The parsed ``randaugment`` spec, or None when off."""
        return parse_randaugment(self.randaugment) if self.randaugment else None
