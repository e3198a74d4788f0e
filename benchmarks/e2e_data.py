"""Sources of the e2e benchmark (JPEG files, Places-LT class profile) and the official-style per-image DataLoader."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from dnet_fast.data.augment import draw_recipe, pil_recipe
from dnet_fast.data.base import IMAGENET_MEAN, IMAGENET_STD, DataBundle, FileSplit, TensorSplit
from dnet_fast.data.policies import Recipe
from dnet_fast.data.transforms import RRC_RATIO, RRC_SCALE, pil_eval

__all__ = [
    "PLACES_LT_TRAIN",
    "OfficialStyleDataset",
    "official_class_accuracy",
    "official_eval_loader",
    "official_train_loader",
    "decode_split",
    "places_lt_counts",
    "scaled_counts",
    "textured_image",
    "write_jpegs",
]

#: The Places-LT train list, beside the checkout as the converters expect it (``../shared/splits``).
PLACES_LT_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "splits" / "Places_LT_train.txt"
_PLACES = {"images": 62_500, "classes": 365, "max": 4980, "min": 5}


def places_lt_counts(path: Path = PLACES_LT_TRAIN) -> tuple[np.ndarray, str]:
    """Per-class image counts of Places-LT train, sorted descending (365 classes, 4,980 .. 5, 62,500 in all).

    Read from the split file when it is present (the source names its sha256 prefix), else an exponential
    profile n_c = 5 + 4975·r^c with r fitted to the 62,500 total, so the suite runs from a bare clone.

    Returns:
        (counts int64 (365,), source description).
    """
    if path.is_file():
        data = path.read_bytes()
        labels = np.array([int(line.rsplit(maxsplit=1)[1]) for line in data.decode().splitlines() if line.strip()])
        counts = np.sort(np.bincount(labels))[::-1].astype(np.int64)
        return counts, f"{path.name} (sha256 {hashlib.sha256(data).hexdigest()[:12]})"
    lo, hi, c = 0.9, 0.99999, np.arange(_PLACES["classes"])
    span = _PLACES["max"] - _PLACES["min"]
    for _ in range(100):  # bisection on the decay rate
        r = (lo + hi) / 2
        lo, hi = (r, hi) if np.round(_PLACES["min"] + span * r**c).sum() < _PLACES["images"] else (lo, r)
    counts = np.round(_PLACES["min"] + span * r**c).astype(np.int64)
    return counts, f"fitted exponential profile ({path} not found)"


def scaled_counts(counts: np.ndarray, total: int, classes: int | None = None) -> np.ndarray:
    """``counts`` scaled to about ``total`` images, every class keeping at least one.

    Args:
        counts: a sorted (descending) class profile.
        total: images wanted.
        classes: keep this many evenly spaced classes of the profile (default all).
    """
    if classes is not None and classes < len(counts):
        counts = counts[np.linspace(0, len(counts) - 1, classes).round().astype(np.int64)]
    return np.maximum(1, np.round(counts * total / counts.sum())).astype(np.int64)


def textured_image(rng: np.random.Generator, side: int, label: int) -> np.ndarray:
    """A side×side uint8 RGB image of smooth noise with a class tint: compresses like a photo (q90 ≈ 15–25 KB
    at 256 px), unlike flat colour or white noise."""
    small = rng.integers(0, 256, size=(max(side // 8, 2), max(side // 8, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small, "RGB").resize((side, side), Image.Resampling.BICUBIC))
    tint = np.array([(37 * label) % 64, (91 * label) % 64, (53 * label) % 64], dtype=np.int16)
    return np.clip(img.astype(np.int16) * 3 // 4 + tint, 0, 255).astype(np.uint8)


def write_jpegs(
    root: Path, labels: np.ndarray, pixels: Callable[[int], np.ndarray], *, quality: int = 90, workers: int = 4
) -> FileSplit:
    """Encodes image ``i`` = ``pixels(i)`` as ``root/<label>/<i>.jpg`` once; returns the split over the files.

    Encoding runs in a thread pool (Pillow releases the GIL while it encodes).
    """

    def write(i: int) -> str:
        rel = f"{int(labels[i]):03d}/{i:07d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(pixels(i), "RGB").save(buf, format="JPEG", quality=quality)
        (root / rel).write_bytes(buf.getvalue())
        return rel

    for label in np.unique(labels):
        (root / f"{int(label):03d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        paths = list(pool.map(write, range(len(labels))))
    return FileSplit(root, tuple(paths), labels)


def decode_split(split: FileSplit, workers: int = 4) -> TensorSplit:
    """The files of ``split`` decoded once (same-size images) into an in-memory split, as dnet-fast's CIFAR
    datasets hold their pixels."""

    def decode(i: int) -> np.ndarray:
        with Image.open(split.path(i)) as f:
            return np.asarray(f.convert("RGB"), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        pixels = np.stack(list(pool.map(decode, range(len(split)))))
    return TensorSplit(torch.from_numpy(pixels), split.labels)


def _cifar_pixels(params: dict, seed: int) -> DataBundle:
    """The synthetic dataset's long-tailed images at the point's CIFAR shape (in memory)."""
    from dnet_fast.config import DataConfig
    from dnet_fast.data import DATASETS

    cfg = DataConfig(
        dataset="synthetic", num_classes=params["classes"], max_count=params["max_count"],
        imbalance=params["imbalance"], image_size=params["image"], val_per_class=params["meta_per_class"],
        test_per_class=1,
    )
    return DATASETS.get("synthetic")(cfg, seed)


def _texture(labels: np.ndarray, side: int, seed: int, stream: int) -> Callable[[int], np.ndarray]:
    return lambda i: textured_image(np.random.default_rng([seed, stream, i]), side, int(labels[i]))


def build_sources(params: dict, root: Path, workers: int, seed: int = 0) -> tuple[DataBundle, str]:
    """Writes the point's train and meta/val JPEG files under ``root``.

    CIFAR family: the synthetic long-tailed images as q95 JPEGs; ImageNet family: ``image``-px textured q90 JPEGs
    with the Places-LT class profile scaled to ``train_images`` (``classes`` evenly spaced classes).

    Returns:
        (bundle of FileSplits (test = val), one-line description of the sources).
    """
    p = params
    if p["family"] == "cifar":
        b = _cifar_pixels(p, seed)
        tr = write_jpegs(root / "train", b.train.labels, lambda i: b.train.images[i].numpy(), quality=95,
                         workers=workers)
        va = write_jpegs(root / "val", b.val.labels, lambda i: b.val.images[i].numpy(), quality=95,
                         workers=workers)
        mean, std = b.mean, b.std
        source = f"synthetic CIFAR-LT images (ρ = {p['imbalance']:g}) as q95 JPEG files"
    else:
        counts, profile = places_lt_counts()
        counts = scaled_counts(counts, p["train_images"], p["classes"])
        labels = np.repeat(np.arange(len(counts)), counts)
        vlabels = np.repeat(np.arange(len(counts)), p["meta_per_class"])
        tr = write_jpegs(root / "train", labels, _texture(labels, p["image"], seed, 1), workers=workers)
        va = write_jpegs(root / "val", vlabels, _texture(vlabels, p["image"], seed, 2), workers=workers)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        source = (
            f"{p['image']}-px textured q90 JPEGs, Places-LT class profile from {profile} scaled to "
            f"{len(labels)} images (head {counts.max()}, tail {counts.min()})"
        )
    n = min(len(tr), 200)
    kb = sum(tr.path(i).stat().st_size for i in range(n)) / n / 1024
    source += f"; train {len(tr)}, meta/val {len(va)} ({p['meta_per_class']}/class); mean file {kb:.1f} KB"
    names = tuple(f"c{i}" for i in range(p["classes"]))
    return DataBundle(tr, va, va, p["classes"], names, p["family"], tuple(mean), tuple(std)), source


def fast_bundle(files: DataBundle, workers: int) -> DataBundle:
    """What dnet-fast trains from: its CIFAR datasets hold pixels in memory (here the JPEGs decoded once, so both
    loops see the same pixels); ImageNet-style datasets are files (shards) that its loaders decode."""
    if files.augment != "cifar":
        return files
    train, val = decode_split(files.train, workers), decode_split(files.val, workers)
    return dataclasses.replace(files, train=train, val=val, test=val)


# ----------------------------------------------------------------------------------------------------------
# Official-style per-image pipeline: what torchvision's ImageFolder-like dataset + transforms do per item.


def _rrc_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box search (10 attempts, then a clamped centre crop): (left, top, w, h)."""
    area = width * height
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height
    w = round(height * RRC_RATIO[1]) if ratio > RRC_RATIO[1] else width
    h = round(width / RRC_RATIO[0]) if ratio < RRC_RATIO[0] else height
    return (width - w) // 2, (height - h) // 2, w, h


class OfficialStyleDataset(Dataset):
    """One item = PIL decode of the file, the released code's PIL augmentation, then ToTensor + Normalize (float32).

    Training, as the official transforms run (SPEC §6.1, §6.2, §13 #6, #8): CIFAR family = 4-px reflect pad, then
    ``RandomCrop(32, padding=4)`` (a second, zero pad), flip, and the ``recipe`` (AutoAugment CIFAR-10, Cutout);
    ImageNet family = 4-px reflect pad, RandomResizedCrop(crop), flip, and the ``recipe`` (ColorJitter,
    RandAugment). Every op runs per image in PIL (``dnet_fast.data.augment.pil_recipe``, the same operations the
    fast loader batches). Eval: CIFAR = none; ImageNet = resize 256 + centre crop 224 (``pil_eval``). Randomness
    from Python's ``random``, which the DataLoader reseeds in every worker (as torchvision transforms draw per
    image).

    Args:
        split: the image files.
        family: ``cifar`` or ``imagenet``.
        train: training augmentation, else the eval transform.
        crop: output side (ImageNet family).
        mean, std: per-channel normalisation.
        recipe: the ops after crop and flip (default none).
    """

    def __init__(
        self, split: FileSplit, family: str, *, train: bool, crop: int, mean: tuple, std: tuple,
        recipe: Recipe | None = None,
    ) -> None:
        self.split, self.family, self.train, self.crop = split, family, train, crop
        self.recipe = recipe if recipe is not None else Recipe()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.split)

    def _augment(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        img = Image.fromarray(np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode="reflect"))  # SPEC §13 #6, #8
        if self.family == "cifar":
            canvas = Image.new("RGB", (w + 16, h + 16))  # RandomCrop(32, padding=4) on the reflect-padded image
            canvas.paste(img, (4, 4))
            left, top = random.randint(0, 16), random.randint(0, 16)
            img = canvas.crop((left, top, left + w, top + h))
        else:
            left, top, bw, bh = _rrc_box(img.width, img.height, random)  # type: ignore[arg-type]
            img = img.resize((self.crop, self.crop), Image.Resampling.BILINEAR, box=(left, top, left + bw, top + bh))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.recipe.active:
            params = draw_recipe(self.recipe, torch.Generator().manual_seed(random.getrandbits(62)), 1)
            img = pil_recipe(img, self.recipe, params, 0)
        return img

    def _image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB image: the file decoded (a subclass may read pixels held in memory)."""
        with Image.open(self.split.path(i)) as f:
            return f.convert("RGB")

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self._image(i)
        if self.train:
            pixels = torch.from_numpy(np.array(self._augment(img), dtype=np.uint8, copy=True))
        else:
            pixels = pil_eval(img, self.family, self.crop)
        x = pixels.permute(2, 0, 1).float().div_(255)  # ToTensor
        return x.sub_(self.mean).div_(self.std), int(self.split.labels[i])  # Normalize


def official_train_loader(
    dataset: OfficialStyleDataset, batch: int, workers: int, *, cuda: bool, samples: int, seed: int = 0
) -> DataLoader:
    """The released code's train loader (shuffle, ``workers`` processes, pinned memory on CUDA), drawing
    ``samples`` indices in one pass of concatenated permutations so the workers start once, not per epoch
    (the per-epoch restart is measured separately as the loader's start time)."""
    sampler = RandomSampler(dataset, num_samples=samples, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=cuda, drop_last=True
    )


def official_eval_loader(dataset: OfficialStyleDataset, batch: int, workers: int, *, cuda: bool) -> DataLoader:
    """The eval loader (file order); workers persist so that repeated passes time the images, not the start."""
    return DataLoader(
        dataset, batch_size=batch, shuffle=False, num_workers=workers, pin_memory=cuda,
        persistent_workers=workers > 0,
    )


@torch.no_grad()
def official_class_accuracy(
    model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device, tree: str
) -> tuple[list[int], list[int]]:
    """Per-class correct/total the released code's way for ``tree`` (``benchmarks/official_epoch.py``).

    ``cifar`` (C:250-271): eval-mode forward per batch, one host read per batch, then a per-sample loop with a
    ``.item()`` per image and one more per correct image. ``imagenet_places`` (I:475-547): per batch, the loss and
    top-1/top-5 read back (4 host reads); the per-class counts from the predictions gathered on the host.
    """
    model.eval()
    correct, total = [0] * num_classes, [0] * num_classes
    for x, y in loader:
        x, y = x.to(device), y.to(device, non_blocking=True)
        out = model(x)
        pred = out.argmax(1)
        if tree == "cifar":
            labels = y.cpu()  # sync point (C:262)
            for j in range(len(labels)):
                label = int(labels[j])
                total[label] += 1
                correct[label] += int(pred[j].item() == label)  # sync point per image (C:268)
            continue
        loss = F.cross_entropy(out, y)
        top5 = out.topk(min(5, out.shape[1]), 1).indices.eq(y[:, None])
        for v in (loss, top5[:, :1].float().mean(), top5.any(1).float().mean(), loss * 0):
            v.item()  # sync points: the code's four reads per batch (I:514, I:526-528)
        for label, p in zip(y.tolist(), pred.tolist(), strict=True):
            total[label] += 1
            correct[label] += int(p == label)
    model.train()
    return correct, total
