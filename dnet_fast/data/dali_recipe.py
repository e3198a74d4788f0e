"""A ``Recipe`` as a DALI graph, built from DALI's automatic-augmentation module (``nvidia.dali.auto_aug``).

The policies are the ones of ``policies``: the CIFAR-10 AutoAugment table becomes a ``core.Policy`` over 10
magnitude bins with the paper's ranges (DALI's own ``reduced_cifar10`` uses TF's 11-bin ranges instead); timm's
RandAugment becomes its 15 ops over 101 bins (magnitude level = bin / 10), each layer applied with probability p
through a conditional and a per-sample magnitude bin ⌊10·clip(N(m, mstd), 0, mmax) + ½⌉. The graph needs
``pipeline_def(enable_conditionals=True)``.

Where DALI cannot follow the tensor recipe exactly (so DALI batches are the same *distribution* of ops, not the
same pixels):

- randomness comes from DALI's seeded generators, not from ``transforms.batch_generator``;
- geometric ops interpolate bilinearly (DALI's ``warp_affine``/``rotate`` have no cubic mode) and fill with one
  grey level (``RAND_FILL``'s mean 115, not the RGB (124, 116, 104); CIFAR's fill 0 is exact);
- magnitudes are quantised to 0.1 levels; enhance ops use DALI's arithmetic (float, rounded) rather than PIL's
  truncating blend, Color uses DALI's ``saturation`` and Equalize DALI's OpenCV-style table;
- the horizontal flip runs after the recipe (fused into ``crop_mirror_normalize``); every op's distribution is
  mirror-symmetric, so the batches' distribution is unchanged;
- Cutout fills with ⌊mean⌋ of each image as the tensor path does.
"""

from __future__ import annotations

from itertools import permutations
from typing import Any

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as a
from nvidia.dali.auto_aug.auto_augment import apply_auto_augment
from nvidia.dali.auto_aug.core import Policy, augmentation, select, signed_bin

from dnet_fast.data.policies import (
    AUTOAUGMENT_BINS,
    AUTOAUGMENT_FILL,
    AUTOAUGMENT_POLICIES,
    RAND_FILL,
    RAND_TRANSFORMS,
    PolicyOp,
    RandAugmentSpec,
    Recipe,
)

__all__ = ["RAND_BINS", "apply_dali_recipe", "autoaugment_policy", "rand_suite"]

RAND_BINS = 101  # RandAugment levels 0.0, 0.1, …, 10.0
_RAND_GREY = round(sum(RAND_FILL) / 3)  # DALI's warp ops take one fill value for every channel


@augmentation
def _equalize(data: Any, _: Any) -> Any:
    return fn.equalize(data)  # auto_aug's own equalize calls the deprecated fn.experimental alias


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=a.sharpness_kernel, param_device="auto")
def _sharpness(data: Any, kernel: Any) -> Any:
    return fn.filter(data, kernel)  # likewise for fn.experimental.filter


def _posterize_tpu_mask(level: float) -> np.ndarray:
    """timm's Posterize: keep int(level/10·4) bits (0 bits: black); the magnitude here is level·0.4."""
    bits = int(level + 1e-6)  # linspace puts integral levels a rounding error either side
    return np.array(255 ^ (2 ** (8 - bits) - 1), dtype=np.uint8)


def _solarize_threshold(level: float) -> np.ndarray:
    return np.array(min(256, int(level + 1e-6)), dtype=np.int32)  # timm: min(256, int(level/10·256))


_AA_SUITE = {
    "ShearX": a.shear_x.augmentation((0, 0.3), True),
    "ShearY": a.shear_y.augmentation((0, 0.3), True),
    "TranslateX": a.translate_x.augmentation((0, 150 / 331), True),
    "TranslateY": a.translate_y.augmentation((0, 150 / 331), True),
    "Rotate": a.rotate.augmentation((0, 30), True),
    "Color": a.color.augmentation((0, 0.9), True, a.shift_enhance_range),
    "Contrast": a.contrast.augmentation((0, 0.9), True, a.shift_enhance_range),
    "Brightness": a.brightness.augmentation((0, 0.9), True, a.shift_enhance_range),
    "Sharpness": _sharpness,
    "Posterize": a.posterize.augmentation((8, 4), False, a.poster_mask_uint8),
    "Solarize": a.solarize.augmentation((256, 0)),
    "Invert": a.invert,
    "Equalize": _equalize,
    "AutoContrast": a.auto_contrast,
}

_RAND_SUITE = {
    "AutoContrast": a.auto_contrast,
    "Equalize": _equalize,
    "Invert": a.invert,
    "Rotate": a.rotate.augmentation((0, 30), True),
    "Posterize": a.posterize.augmentation((0, 4), False, _posterize_tpu_mask),
    "Solarize": a.solarize.augmentation((0, 256), False, _solarize_threshold),
    "SolarizeAdd": a.solarize_add.augmentation((0, 110)),
    "Color": a.color.augmentation((0.1, 1.9), False, None),
    "Contrast": a.contrast.augmentation((0.1, 1.9), False, None),
    "Brightness": a.brightness.augmentation((0.1, 1.9), False, None),
    "Sharpness": _sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted),
    "ShearX": a.shear_x.augmentation((0, 0.3), True),
    "ShearY": a.shear_y.augmentation((0, 0.3), True),
    "TranslateXRel": a.translate_x.augmentation((0, 0.45), True),
    "TranslateYRel": a.translate_y.augmentation((0, 0.45), True),
}


def _policy_op(op: PolicyOp) -> tuple[Any, float, int | None]:
    aug = _AA_SUITE[op.name]
    return aug, op.prob, op.bin if aug.mag_range is not None else None  # ops without a magnitude take None


def autoaugment_policy(name: str) -> Policy:
    """The AutoAugment table ``name`` as a DALI Policy (10 bins; ops of probability 0 dropped, never applied)."""
    subs = [[_policy_op(op) for op in sub if op.prob > 0] for sub in AUTOAUGMENT_POLICIES[name]]
    return Policy(f"dnet_fast_{name}", num_magnitude_bins=AUTOAUGMENT_BINS, sub_policies=subs)


def rand_suite() -> list[Any]:
    """timm's 15 RandAugment ops (``policies.RAND_TRANSFORMS`` order) as DALI augmentations over RAND_BINS."""
    return [_RAND_SUITE[name] for name in RAND_TRANSFORMS]


def _contrast(x: Any, factor: Any) -> Any:
    """PIL-style contrast: blend with the image's luma mean (DALI's ``contrast`` centres on 128)."""
    mean = fn.reductions.mean(x, axis_names="HW", keep_dims=True)
    weights = types.Constant(np.array([0.299, 0.587, 0.114], dtype=np.float32))
    centre = fn.reductions.sum(mean * weights, axis_names="C", keep_dims=True)
    return fn.cast_like(centre + (x - centre) * factor, x)


def _color_jitter(x: Any, strength: float) -> Any:
    """torchvision ColorJitter(j, j, j, 0): three factors U[max(0, 1 − j), 1 + j] in a random order per image."""
    lo, hi = max(0.0, 1 - strength), 1 + strength
    b, c, s = (fn.random.uniform(range=[lo, hi]) for _ in range(3))
    ops = (
        lambda img: fn.brightness(img, brightness=b),
        lambda img: _contrast(img, c),
        lambda img: fn.saturation(img, saturation=s),
    )
    order = fn.random.uniform(values=list(range(6)), dtype=types.INT32)
    for k, perm in enumerate(permutations(range(3))):
        if order == k:  # a DALI conditional: each sample takes the branch of its permutation
            for i in perm:
                x = ops[i](x)
    return x


def _rand_augment(x: Any, ra: RandAugmentSpec, hw: tuple[int, int]) -> Any:
    suite = rand_suite()
    for _ in range(ra.n):
        level = fn.random.normal(mean=ra.m, stddev=ra.mstd) if ra.mstd else types.Constant(np.float32(ra.m))
        bins = fn.cast(dmath.floor(dmath.clamp(level, 0.0, ra.mmax) * 10.0 + 0.5), dtype=types.INT32)
        op = fn.random.uniform(values=list(range(len(suite))), dtype=types.INT32)
        if fn.random.coin_flip(probability=ra.p):
            x = select(
                suite,
                op,
                x,
                magnitude_bin=signed_bin(bins),
                num_magnitude_bins=RAND_BINS,
                shape=hw,
                fill_value=_RAND_GREY,
                interp_type=types.INTERP_LINEAR,
            )
    return x


def _cutout(x: Any, size: int, hw: tuple[int, int]) -> Any:
    """A side-``size`` square at a uniform centre, clipped by ``fn.erase``, filled with ⌊image mean⌋."""
    centre = dmath.floor(fn.random.uniform(range=[0.0, 1.0], shape=[2]) * types.Constant(np.float32(hw)))
    anchor = centre - float(size // 2)
    erase = {"anchor": anchor, "shape": [size, size], "axis_names": "HW", "fill_value": 0}
    keep = fn.erase(fn.ones_like(x), **erase)  # 1 outside the square, 0 inside
    fill = dmath.floor(fn.reductions.mean(x))
    return fn.cast(x * keep + fill * (1 - keep), dtype=types.UINT8)


def apply_dali_recipe(images: Any, recipe: Recipe, hw: tuple[int, int]) -> Any:
    """The recipe on a DALI batch of uint8 HWC images of size ``hw``: ColorJitter → RandAugment → AutoAugment →
    Cutout (the order of ``augment.apply_recipe``)."""
    if recipe.color_jitter:
        images = _color_jitter(images, recipe.color_jitter)
    if (ra := recipe.rand) is not None:
        images = _rand_augment(images, ra, hw)
    if recipe.autoaugment:
        policy = autoaugment_policy(recipe.autoaugment)
        images = apply_auto_augment(
            policy, images, shape=hw, fill_value=AUTOAUGMENT_FILL[0], interp_type=types.INTERP_LINEAR
        )
    if recipe.cutout:
        images = _cutout(images, recipe.cutout, hw)
    return images
