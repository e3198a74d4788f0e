"""Affine warps of uint8 batches that reproduce PIL's ``Image.transform`` (AFFINE, bilinear or bicubic) exactly.

PIL maps each output pixel centre (x + ½, y + ½) through the inverse matrix (a, b, c, d, e, f) to an input point
(u, v) = (a·x' + b·y' + c, d·x' + e·y' + f); a point outside [0, W) × [0, H) keeps the fill colour, any other is
interpolated around (u − ½, v − ½) with edge-clamped taps and truncated to uint8 (``libImaging/Geometry.c``:
``affine_transform``, ``bilinear_filter32RGB``, ``bicubic_filter32RGB`` with its a = −1 cubic). The batched version
below performs the same float64 operations in the same order, one image per matrix, so on the CPU it returns
PIL's pixels bit for bit (tests/test_augment_ops.py); on a GPU the same holds as long as no kernel fuses a
multiply-add (each line here is a separate elementwise op).
"""

from __future__ import annotations

import math

import torch

__all__ = ["affine_matrix", "to_device", "warp_affine"]


def to_device(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small CPU tensor (per-image arguments, row indices) cast on the CPU, then sent to ``like``'s device.

    ``non_blocking``: a blocking host→device copy waits for the stream, a sync point per op otherwise.
    """
    return t.to(dtype or t.dtype).to(like.device, non_blocking=True)


def _rotate_matrix(degrees: float, width: int, height: int) -> list[float]:
    """PIL ``Image.rotate``'s inverse matrix (counter-clockwise about the centre), computed as PIL computes it."""
    angle = -math.radians(degrees % 360.0)
    m = [
        round(math.cos(angle), 15),
        round(math.sin(angle), 15),
        0.0,
        round(-math.sin(angle), 15),
        round(math.cos(angle), 15),
        0.0,
    ]
    cx, cy = width / 2, height / 2
    m[2], m[5] = m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5]
    m[2] += cx
    m[5] += cy
    return m


def affine_matrix(name: str, arg: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix (a, b, c, d, e, f) PIL uses for op ``name`` with argument ``arg``.

    ShearX/ShearY: factor; TranslateX/TranslateY: pixels; Rotate: degrees (the matrices of timm's and
    DeepVoltaire's ``img.transform`` / ``img.rotate`` calls).
    """
    if name == "Rotate":
        return _rotate_matrix(arg, width, height)
    return {
        "ShearX": [1.0, arg, 0.0, 0.0, 1.0, 0.0],
        "ShearY": [1.0, 0.0, 0.0, arg, 1.0, 0.0],
        "TranslateX": [1.0, 0.0, arg, 0.0, 1.0, 0.0],
        "TranslateY": [1.0, 0.0, 0.0, 0.0, 1.0, arg],
    }[name]


def _cubic(
    v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """PIL's BICUBIC macro (a = −1 cubic convolution), operation for operation (integer taps are exact in float64)."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


class _Taps:
    """Reads edge-clamped pixels of a (k, H, W, 3) batch at (row offset, column offset) from the floor grid."""

    def __init__(self, images: torch.Tensor, fy: torch.Tensor, fx: torch.Tensor) -> None:
        k, h, w, _ = images.shape
        self.flat = images.reshape(k * h * w, 3)  # one 3-byte row per pixel: index_select copies rows
        base = (torch.arange(k, device=images.device) * (h * w)).view(k, 1, 1)
        self.rows = {i: (fy + i).clamp_(0, h - 1).mul_(w).add_(base) for i in range(-1, 3)}  # (k, H, W) int64
        self.cols = {j: (fx + j).clamp_(0, w - 1) for j in range(-1, 3)}

    def __call__(self, i: int, j: int) -> torch.Tensor:
        """float64 (k, H, W, 3) pixels at rows fy + i, columns fx + j (clamped to the image)."""
        idx = self.rows[i] + self.cols[j]
        return self.flat.index_select(0, idx.view(-1)).view(*idx.shape, 3).double()


def _lerp(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * d  # PIL's BILINEAR macro


def _interpolate(
    taps: _Taps, grid: tuple[torch.Tensor, torch.Tensor], bicubic: bool, exact: tuple[bool, bool]
) -> torch.Tensor:
    """float64 (k, H, W, 3) values from the taps and the fractions (dy, dx); an ``exact`` axis has d ≡ 0.

    Where d ≡ 0 along an axis, PIL's formula returns the tap at the floor index exactly (p1 + 0·(…) = p1,
    a + (b − a)·0 = a), so that axis needs one tap instead of two or four.
    """
    dy, dx = grid
    span = range(-1, 3) if bicubic else range(2)
    rows = [0] if exact[0] else span
    cols = [0] if exact[1] else span
    mix = _cubic if bicubic else _lerp
    lines = []
    for i in rows:
        line = [taps(i, j) for j in cols]
        lines.append(line[0] if exact[1] else mix(*line, dx))
    return lines[0] if exact[0] else mix(*lines, dy)


def _sample(
    images: torch.Tensor, mats: torch.Tensor, bicubic: bool, exact: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolated uint8 pixels (k, H, W, 3) and the (k, H, W, 1) mask of points inside the source."""
    k, h, w, _ = images.shape
    dev = images.device
    a = to_device(mats, images).view(k, 6, 1, 1).unbind(1)  # six float64 (k, 1, 1)
    xs = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    u = a[0] * xs + a[1] * ys + a[2]  # (k, H, W): PIL's a0·x + a1·y + a2
    v = a[3] * xs + a[4] * ys + a[5]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    u, v = u - 0.5, v - 0.5
    fx, fy = u.floor(), v.floor()
    # (dy, dx) as contiguous (k, H, W, 3): same-shape float64 operands keep torch's kernels vectorised.
    grid = tuple((t - ft)[..., None].expand(k, h, w, 3).contiguous() for t, ft in ((v, fy), (u, fx)))
    value = _interpolate(_Taps(images, fy.long(), fx.long()), grid, bicubic, exact)
    # Bilinear values are convex combinations (already in [0, 255]); PIL clips bicubic ones, then truncates.
    return value.clamp(0, 255).trunc().to(torch.uint8), inside[..., None]


def _integral_axes(mats: torch.Tensor) -> torch.Tensor:
    """bool (k, 2): whether v − ½ (rows) and u − ½ (columns) are integers at every pixel, i.e. d ≡ 0 there.

    That holds when the axis maps as identity plus an integral shift (shears and translations leave one axis so).
    """
    a, b, c, d, e, f = mats.unbind(1)
    rows = (d == 0) & (e == 1) & (f == f.round())
    cols = (a == 1) & (b == 0) & (c == c.round())
    return torch.stack([rows, cols], 1)


def warp_affine(
    images: torch.Tensor, mats: torch.Tensor, bicubic: torch.Tensor, fill: tuple[int, int, int]
) -> torch.Tensor:
    """PIL-exact affine warp of each image by its own inverse matrix.

    Args:
        images: uint8 (k, H, W, 3) on any device.
        mats: float64 (k, 6) inverse matrices (:func:`affine_matrix`), CPU.
        bicubic: bool (k,) CPU: bicubic where True, bilinear elsewhere.
        fill: RGB colour of points mapped outside the source.

    Returns:
        uint8 (k, H, W, 3).
    """
    out = torch.empty_like(images)
    colour = to_device(torch.tensor(fill, dtype=torch.uint8), images)
    # Group images by resampling and by exact axes (CPU tensors: no device sync): 8 kinds at most.
    kind = bicubic.long() * 4 + _integral_axes(mats).long() @ torch.tensor([2, 1])
    for key in torch.unique(kind).tolist():
        rows = torch.nonzero(kind == key).flatten()
        idx = to_device(rows, images)
        exact = (bool(key & 2), bool(key & 1))
        pixels, inside = _sample(images.index_select(0, idx), mats[rows], bool(key & 4), exact)
        out.index_copy_(0, idx, torch.where(inside, pixels, colour))
    return out
