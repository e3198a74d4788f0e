"""The embedded synthetic long-tailed image dataset (``synthetic``): seeded, generated in memory, no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dnet_fast.config import DataConfig
from dnet_fast.data.base import DATASETS, DataBundle, TensorSplit

__all__ = [
    "DIFFICULTY_LEVELS",
    "SyntheticDesign",
    "build_synthetic",
    "design_classes",
    "exponential_counts",
    "render",
]

DIFFICULTY_LEVELS = ("easy", "medium", "hard")
_SHARE = np.array([0.0, 0.5, 0.75])  # fraction of the prototype taken from the confuser class, per level
_NOISE = np.array([0.15, 0.3, 0.5])  # per-pixel Gaussian noise σ (prototype amplitude ≈ 1), per level
_COMPONENTS = 3  # gratings per class prototype
_CHUNK = 2048  # samples rendered at once (bounds the (N, J, S, S) temporary)
_STREAMS = {"design": 0, "train": 1, "val": 2, "test": 3}  # independent RNG streams per use


@dataclass(frozen=True)
class SyntheticDesign:
    """Per-class generative parameters (all arrays indexed by class, K = components per class).

    Attributes:
        centre: (C, K, 2) grating-envelope centres in units of the image side.
        sigma: (C, K) Gaussian envelope widths in units of the image side.
        theta: (C, K) grating orientations in radians.
        freq: (C, K) spatial frequencies in cycles per image side.
        phase: (C, K) grating phases.
        colour: (C, K, 3) RGB directions of each grating.
        level: (C,) difficulty level index into DIFFICULTY_LEVELS.
        confuser: (C,) class whose prototype a medium/hard class mostly copies (itself when easy).
    """

    centre: np.ndarray
    sigma: np.ndarray
    theta: np.ndarray
    freq: np.ndarray
    phase: np.ndarray
    colour: np.ndarray
    level: np.ndarray
    confuser: np.ndarray


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, _STREAMS[stream]]))


def exponential_counts(max_count: int, num_classes: int, imbalance: float) -> np.ndarray:
    """n_c = ⌊n_max·ρ^(−c/(C−1))⌋, at least 1; int64 (C,), class 0 the head."""
    c = np.arange(num_classes, dtype=np.float64)
    counts = np.floor(max_count * (1.0 / imbalance) ** (c / max(num_classes - 1, 1)))
    return np.maximum(counts, 1).astype(np.int64)


def _difficulty_levels(rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """Levels from a seeded permutation of a balanced easy/medium/hard pattern, not monotone in frequency.

    The head third gets at least one hard class and the tail third at least one easy class (swapped in when the
    permutation did not already do so), so reweighting by frequency alone cannot be optimal.
    """
    levels = rng.permutation(np.arange(num_classes) % len(DIFFICULTY_LEVELS))
    third = max(num_classes // 3, 1)
    levels = _ensure_level(levels, np.arange(third), 2, rng)
    return _ensure_level(levels, np.arange(num_classes - third, num_classes), 0, rng)


def _ensure_level(levels: np.ndarray, where: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Makes one class in ``where`` have ``level``, swapping levels with a class that has it (if any)."""
    if (levels[where] == level).any():
        return levels
    levels = levels.copy()
    target = where[rng.integers(len(where))]
    donors = np.flatnonzero(levels == level)
    if len(donors):
        levels[donors[rng.integers(len(donors))]] = levels[target]
    levels[target] = level
    return levels


def design_classes(num_classes: int, seed: int) -> SyntheticDesign:
    """Draws every class's prototype parameters, difficulty level and confuser from ``seed``."""
    rng = _rng(seed, "design")
    shape = (num_classes, _COMPONENTS)
    colour = rng.normal(size=(*shape, 3))
    colour /= np.linalg.norm(colour, axis=-1, keepdims=True)
    level = _difficulty_levels(rng, num_classes)
    # Confuser: a uniformly drawn *other* class (shift by 1..C-1 keeps it distinct).
    confuser = (np.arange(num_classes) + rng.integers(1, num_classes, size=num_classes)) % num_classes
    confuser = np.where(level == 0, np.arange(num_classes), confuser)
    return SyntheticDesign(
        centre=rng.uniform(0.3, 0.7, size=(*shape, 2)),
        sigma=rng.uniform(0.18, 0.32, size=shape),
        theta=rng.uniform(0.0, np.pi, size=shape),
        freq=rng.uniform(1.0, 3.0, size=shape),
        phase=rng.uniform(0.0, 2 * np.pi, size=shape),
        colour=colour,
        level=level,
        confuser=confuser,
    )


def render(design: SyntheticDesign, labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one image per label: class prototype + random shift, phase, contrast, colour cast and noise.

    Args:
        design: the class parameters.
        labels: (N,) class ids.
        size: image side S in pixels.
        rng: the generator every per-sample draw comes from.

    Returns:
        uint8 (N, S, S, 3).
    """
    out = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        chunk = labels[start : start + _CHUNK]
        out[start : start + len(chunk)] = _render_chunk(design, chunk, size, rng)
    return out


def _render_chunk(
    design: SyntheticDesign, labels: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    n = len(labels)
    # Components: the class's own K gratings then its confuser's K, weighted (1 - share) and share.
    own, conf = labels, design.confuser[labels]
    share = _SHARE[design.level[labels]]  # (N,)
    weight = np.concatenate(
        [np.repeat((1 - share)[:, None], _COMPONENTS, 1), np.repeat(share[:, None], _COMPONENTS, 1)], 1
    )

    def both(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[own], a[conf]], axis=1)  # (N, 2K, ...)

    centre, sigma, theta = both(design.centre), both(design.sigma), both(design.theta)
    freq, phase, colour = both(design.freq), both(design.phase), both(design.colour)
    shift = rng.uniform(-0.06, 0.06, size=(n, 1, 2))  # whole-image translation, units of the side
    jitter = rng.normal(0.0, 0.4, size=(n, 1))  # phase jitter shared by the gratings of one image
    grid = (np.arange(size) + 0.5) / size  # (S,)
    u = grid[None, None, None, :] - (centre[..., 0] + shift[..., 0])[..., None, None]  # (N, 2K, 1, S)
    v = grid[None, None, :, None] - (centre[..., 1] + shift[..., 1])[..., None, None]  # (N, 2K, S, 1)
    envelope = np.exp(-(u**2 + v**2) / (2 * sigma[..., None, None] ** 2))  # (N, 2K, S, S)
    along = u * np.cos(theta)[..., None, None] + v * np.sin(theta)[..., None, None]
    wave = np.cos(2 * np.pi * freq[..., None, None] * along + (phase + jitter)[..., None, None])
    pattern = (weight[..., None, None] * envelope * wave).astype(np.float32)  # (N, 2K, S, S)
    img = np.einsum("njhw,njc->nhwc", pattern, colour.astype(np.float32))  # (N, S, S, 3)
    img *= rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)  # contrast
    img += rng.normal(0.0, 0.1, size=(n, 1, 1, 3)).astype(np.float32)  # colour cast
    img += (
        rng.normal(0.0, 1.0, size=img.shape).astype(np.float32)
        * _NOISE[design.level[labels]][:, None, None, None]
    )
    return np.clip(np.rint(128.0 + 90.0 * img), 0, 255).astype(np.uint8)


def _balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def _split(design: SyntheticDesign, labels: np.ndarray, size: int, seed: int, stream: str) -> TensorSplit:
    images = render(design, labels, size, _rng(seed, stream))
    return TensorSplit(torch.from_numpy(images), labels)


@DATASETS.register("synthetic")
def build_synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    """Builds the synthetic long-tailed dataset (exponential profile, frequency-independent difficulty).

    Args:
        cfg: uses num_classes, max_count, imbalance, image_size, val_per_class and test_per_class.
        seed: the only source of randomness; the same seed gives bit-identical images.

    Returns:
        A bundle with CIFAR-style augmentation; ``info`` records counts, difficulty levels and confusers.
    """
    c, size = cfg.num_classes, cfg.image_size
    design = design_classes(c, seed)
    counts = exponential_counts(cfg.max_count, c, cfg.imbalance)
    train = _split(design, np.repeat(np.arange(c, dtype=np.int64), counts), size, seed, "train")
    val = _split(design, _balanced_labels(c, cfg.val_per_class), size, seed, "val")
    test = _split(design, _balanced_labels(c, cfg.test_per_class), size, seed, "test")
    pixels = train.images.reshape(-1, 3).double() / 255.0  # (N·S·S, 3)
    info = {
        "default_loader": "resident",
        "generator": "synthetic-v1",
        "seed": seed,
        "counts": counts.tolist(),
        "difficulty": [DIFFICULTY_LEVELS[i] for i in design.level],
        "confuser": design.confuser.tolist(),
        "noise": _NOISE[design.level].tolist(),
        "share": _SHARE[design.level].tolist(),
    }
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=c,
        class_names=tuple(f"class{i:0{len(str(c - 1))}d}" for i in range(c)),
        augment="cifar",
        mean=tuple(round(float(m), 4) for m in pixels.mean(0)),
        std=tuple(round(float(s), 4) for s in pixels.std(0)),
        info=info,
    )
