"""A ``Recipe``'s random draws and its application: batched on uint8 tensors, or per image with PIL.

The random numbers of a batch come from the batch's seeded generator (:func:`draw_recipe`, called by
``transforms.draw_params`` after the crop and flip draws), so a batch stays a pure function of (seed, epoch,
batch). :func:`recipe_stages` turns them into per-image op choices and arguments (CPU tensors); the batched path
(:func:`apply_recipe`) then runs each op kind once on the subset of images that chose it (``index_select`` /
``index_copy_``, no host sync: the choices already live on the CPU), and the PIL path (:func:`pil_recipe`) runs
the same ops with PIL on one image. Both see the same arguments, and every op is PIL-exact (``augment_ops``), so
the two paths agree bit for bit on the same input pixels.

Cutout follows the official CIFAR code in where it runs — on the uint8 image after AutoAugment, before
ToTensor/Normalize — and in its fill, the image's mean grey level ⌊mean of all pixels and channels⌋ (numpy's
float→uint8 assignment truncates); its geometry is the correct one (SPEC §13 #7): a centre uniform over the image
and a side-``cutout`` square clipped at the border.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image

from dnet_fast.data.augment_ops import OPS
from dnet_fast.data.policies import (
    AUTOAUGMENT_FILL,
    AUTOAUGMENT_POLICIES,
    COLOR_JITTER_OPS,
    RAND_FILL,
    RAND_OPS,
    RAND_TRANSFORMS,
    RandAugmentSpec,
    Recipe,
    autoaugment_arg,
    randaugment_arg,
)
from dnet_fast.data.warp import to_device

__all__ = [
    "Stage",
    "apply_recipe",
    "cutout_boxes",
    "draw_recipe",
    "pil_recipe",
    "recipe_stages",
]


ArgFn = Callable[[str, torch.Tensor], torch.Tensor]  # (op name, rows) → float64 arguments of those rows


def draw_recipe(recipe: Recipe, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """The recipe's random numbers for ``n`` images (CPU), in a fixed order; nothing for an inactive recipe.

    ``cj_u`` (n, 3) factor uniforms and ``cj_order`` (n, 3) permutations (ColorJitter); ``ra_op`` (n, N) op
    ids, ``ra_u`` apply uniforms, ``ra_z`` standard normals, ``ra_neg`` signs, ``ra_bicubic`` resampling
    (RandAugment); ``aa_policy`` (n,) sub-policy ids, ``aa_u`` (n, 2), ``aa_neg`` (n, 2) (AutoAugment);
    ``co_u`` (n, 2) centre uniforms (Cutout).
    """
    f64 = torch.float64
    out: dict[str, torch.Tensor] = {}
    if recipe.color_jitter:
        out["cj_u"] = torch.rand(n, 3, generator=gen, dtype=f64)
        out["cj_order"] = torch.rand(n, 3, generator=gen).argsort(1)  # a uniform permutation per image
    if (ra := recipe.rand) is not None:
        shape = (n, ra.n)
        out["ra_op"] = torch.randint(0, len(RAND_TRANSFORMS), shape, generator=gen)
        out["ra_u"] = torch.rand(shape, generator=gen, dtype=f64)
        out["ra_z"] = torch.randn(shape, generator=gen, dtype=f64)
        out["ra_neg"] = torch.rand(shape, generator=gen) < 0.5
        out["ra_bicubic"] = torch.rand(shape, generator=gen) < 0.5  # timm: random.choice((BILINEAR, BICUBIC))
    if recipe.autoaugment:
        policy = AUTOAUGMENT_POLICIES[recipe.autoaugment]
        out["aa_policy"] = torch.randint(0, len(policy), (n,), generator=gen)
        out["aa_u"] = torch.rand(n, 2, generator=gen, dtype=f64)
        out["aa_neg"] = torch.rand(n, 2, generator=gen) < 0.5
    if recipe.cutout:
        out["co_u"] = torch.rand(n, 2, generator=gen, dtype=f64)
    return out


@dataclass(frozen=True)
class Stage:
    """One op slot of every image (e.g. "the first op of the AutoAugment sub-policy"); CPU tensors.

    Attributes:
        names: the op names ``op`` indexes (``augment_ops.OPS`` keys).
        op: int64 (n,) the op each image runs.
        apply: bool (n,) whether it runs.
        arg: float64 (n,) its argument (factor, bits, threshold, degrees, pixels; 0 when it has none).
        bicubic: bool (n,) resampling of geometric ops (bilinear where False).
        fill: RGB fill of geometric ops.
    """

    names: tuple[str, ...]
    op: torch.Tensor
    apply: torch.Tensor
    arg: torch.Tensor
    bicubic: torch.Tensor
    fill: tuple[int, int, int]


def _args(names: tuple[str, ...], op: torch.Tensor, arg_of: ArgFn) -> torch.Tensor:
    """float64 (n,) arguments: ``arg_of(name, rows)`` for the rows whose ``op`` picks each name."""
    arg = torch.zeros(len(op), dtype=torch.float64)
    for k, name in enumerate(names):
        rows = torch.nonzero(op == k).flatten()
        if len(rows):
            arg[rows] = arg_of(name, rows)
    return arg


def _color_jitter_stages(recipe: Recipe, p: dict[str, torch.Tensor]) -> list[Stage]:
    lo, hi = max(0.0, 1 - recipe.color_jitter), 1 + recipe.color_jitter
    factors = lo + (hi - lo) * p["cj_u"]  # (n, 3): brightness, contrast, saturation
    n = len(factors)
    everyone, no_warp = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    stages = []
    for slot in range(3):
        op = p["cj_order"][:, slot]  # which of the three runs in this slot, per image
        arg = factors.gather(1, op[:, None])[:, 0]
        stages.append(Stage(COLOR_JITTER_OPS, op, everyone, arg, no_warp, AUTOAUGMENT_FILL))
    return stages


def _rand_arg(
    name: str, rows: torch.Tensor, level: torch.Tensor, negate: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    transform = RAND_TRANSFORMS[list(RAND_OPS.values()).index(name)]
    return randaugment_arg(transform, level[rows], negate[rows], *hw)


def _randaugment_stages(ra: RandAugmentSpec, p: dict[str, torch.Tensor], hw: tuple[int, int]) -> list[Stage]:
    level = (ra.m + ra.mstd * p["ra_z"]).clamp(0.0, ra.mmax) if ra.mstd else torch.full_like(p["ra_z"], ra.m)
    names = tuple(RAND_OPS[t] for t in RAND_TRANSFORMS)
    stages = []
    for layer in range(ra.n):
        op = p["ra_op"][:, layer]
        arg_of = partial(_rand_arg, level=level[:, layer], negate=p["ra_neg"][:, layer], hw=hw)
        apply = p["ra_u"][:, layer] <= ra.p  # timm skips an op when random() > p
        stages.append(Stage(names, op, apply, _args(names, op, arg_of), p["ra_bicubic"][:, layer], RAND_FILL))
    return stages


def _auto_arg(
    name: str, rows: torch.Tensor, bins: torch.Tensor, negate: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    return autoaugment_arg(name, bins[rows], negate[rows], *hw)


def _autoaugment_stages(recipe: Recipe, p: dict[str, torch.Tensor], hw: tuple[int, int]) -> list[Stage]:
    policy = AUTOAUGMENT_POLICIES[recipe.autoaugment]
    names = tuple(sorted({o.name for sub in policy for o in sub}))
    sub_id = p["aa_policy"]  # (n,)
    cubic = torch.ones(len(sub_id), dtype=torch.bool)  # the official code's scipy spline is cubic (order 3)
    stages = []
    for slot in range(2):
        ops = [sub[slot] for sub in policy]
        op = torch.tensor([names.index(o.name) for o in ops])[sub_id]  # (n,)
        prob = torch.tensor([o.prob for o in ops], dtype=torch.float64)[sub_id]
        bins = torch.tensor([o.bin for o in ops])[sub_id]
        arg_of = partial(_auto_arg, bins=bins, negate=p["aa_neg"][:, slot], hw=hw)
        apply = p["aa_u"][:, slot] < prob  # DeepVoltaire's SubPolicy: random.random() < p
        stages.append(Stage(names, op, apply, _args(names, op, arg_of), cubic, AUTOAUGMENT_FILL))
    return stages


def recipe_stages(recipe: Recipe, params: dict[str, torch.Tensor], hw: tuple[int, int]) -> list[Stage]:
    """The op stages of a batch in application order: ColorJitter (3), RandAugment (n), AutoAugment (2).

    Args:
        recipe: the recipe.
        params: the batch's draws (``draw_recipe`` keys; other keys are ignored).
        hw: (height, width) of the images the ops see (after the crop).
    """
    stages: list[Stage] = []
    if recipe.color_jitter:
        stages += _color_jitter_stages(recipe, params)
    if (ra := recipe.rand) is not None:
        stages += _randaugment_stages(ra, params, hw)
    if recipe.autoaugment:
        stages += _autoaugment_stages(recipe, params, hw)
    return stages


def cutout_boxes(size: int, params: dict[str, torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
    """Cutout squares clipped to the image: int64 (n, 4) rows (top, bottom, left, right), half-open.

    The centre (⌊u·H⌋, ⌊u'·W⌋) is uniform over the pixels; the square spans centre − size//2 … + size − size//2.
    """
    h, w = hw
    cy = torch.floor(params["co_u"][:, 0] * h).long()
    cx = torch.floor(params["co_u"][:, 1] * w).long()
    top, left = cy - size // 2, cx - size // 2
    return torch.stack(
        [top.clamp(0, h), (top + size).clamp(0, h), left.clamp(0, w), (left + size).clamp(0, w)], 1
    )


def _cutout(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Fills each image's box with its mean grey level; uint8 (B, H, W, 3) → same."""
    b, h, w, _ = x.shape
    dev = x.device
    box = to_device(boxes, x)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    inside_r = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # (B, H)
    inside_c = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    mask = (inside_r[:, :, None] & inside_c[:, None, :])[..., None]  # (B, H, W, 1)
    mean = x.sum(dim=(1, 2, 3), dtype=torch.int64) // (h * w * 3)  # ⌊mean⌋, exact in integers
    return torch.where(mask, mean.to(torch.uint8).view(b, 1, 1, 1), x)


def apply_recipe(images: torch.Tensor, recipe: Recipe, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The recipe on a batch: uint8 (B, H, W, 3) on any device → uint8 (B, H, W, 3); every image its own ops.

    Args:
        images: the cropped and flipped batch (not modified).
        recipe: which ops.
        params: the batch's draws (``draw_params(..., recipe)`` or ``draw_recipe``), CPU.
    """
    if not recipe.active:
        return images
    hw = (images.shape[1], images.shape[2])
    x = images.clone()
    for stage in recipe_stages(recipe, params, hw):
        for k, name in enumerate(stage.names):
            rows = torch.nonzero(stage.apply & (stage.op == k)).flatten()  # CPU
            if len(rows) == 0:
                continue
            idx = to_device(rows, x)
            out = OPS.get(name).batched(
                x.index_select(0, idx), stage.arg[rows], stage.bicubic[rows], stage.fill
            )
            x.index_copy_(0, idx, out)
    if recipe.cutout:
        x = _cutout(x, cutout_boxes(recipe.cutout, params, hw))
    return x


def pil_recipe(img: Image.Image, recipe: Recipe, params: dict[str, torch.Tensor], row: int) -> Image.Image:
    """The recipe on image ``row`` of a batch with PIL (the naive loader's path); RGB image → RGB image."""
    if not recipe.active:
        return img
    one = {k: v[row : row + 1] for k, v in params.items()}
    hw = (img.height, img.width)
    for stage in recipe_stages(recipe, one, hw):
        if bool(stage.apply[0]):
            op = OPS.get(stage.names[int(stage.op[0])])
            img = op.pil(img, float(stage.arg[0]), bool(stage.bicubic[0]), stage.fill)
    if recipe.cutout:
        top, bottom, left, right = cutout_boxes(recipe.cutout, one, hw)[0].tolist()
        if bottom > top and right > left:
            fill = int(np.asarray(img, dtype=np.uint8).mean())  # the official fill: img.mean(), truncated
            img = img.copy()
            img.paste((fill, fill, fill), (left, top, right, bottom))
    return img
