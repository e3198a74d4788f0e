"""The split-list dataset ``splits``: an image root plus OLTR-style split files (ImageNet-LT, Places-LT; SPEC §9)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from dnet_fast.config import DataConfig
from dnet_fast.data.base import DATASETS, IMAGENET_MEAN, IMAGENET_STD, DataBundle, FileSplit

__all__ = [
    "LAYOUTS",
    "build_splits",
    "class_names_from_paths",
    "draw_per_class",
    "parse_split_file",
    "parse_split_lines",
    "resolve_layout",
]


def parse_split_lines(lines: list[str], source: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Parses ``relative/path label`` lines (blank lines skipped).

    Args:
        lines: the file's lines.
        source: file name used in error messages.

    Returns:
        (paths, labels int64 (N,)).

    Raises:
        ValueError: ``source:line: ...`` for a malformed line, a non-integer or a negative label.
    """
    paths, labels = [], []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)  # the path may not contain the separator, but keep it robust
        if len(parts) != 2:
            msg = f"{source}:{lineno}: expected '<relative path> <integer label>', got {text!r}"
            raise ValueError(msg)
        try:
            label = int(parts[1])
        except ValueError:
            msg = f"{source}:{lineno}: label {parts[1]!r} is not an integer"
            raise ValueError(msg) from None
        if label < 0:
            msg = f"{source}:{lineno}: label {label} is negative"
            raise ValueError(msg)
        paths.append(parts[0])
        labels.append(label)
    if not paths:
        msg = f"{source}: no entries"
        raise ValueError(msg)
    return tuple(paths), np.asarray(labels, dtype=np.int64)


def parse_split_file(path: str | Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Reads an OLTR split file; see :func:`parse_split_lines`."""
    path = Path(path)
    if not path.is_file():
        msg = f"split file not found: {path}"
        raise FileNotFoundError(msg)
    with path.open(encoding="utf-8") as f:
        return parse_split_lines(f.read().splitlines(), str(path))


def _as_listed(rel: str) -> str:
    return rel


def _places365(rel: str) -> str:
    """OLTR Places paths to the Places365 ``data_256`` / ``val_256`` layout (``a-b`` categories are ``a/b``)."""
    parts = PurePosixPath(rel).parts
    if len(parts) != 3:
        return rel
    split, category, name = parts
    if split == "val":
        return f"val_256/{name}"
    return f"data_256/{category[0]}/{category.replace('-', '/')}/{name}"


def _flat_val(rel: str) -> str:
    """ImageNet test paths ``val/<wnid>/ILSVRC2012_val_*.JPEG`` in a flat ``val/`` folder (the official loader)."""
    parts = PurePosixPath(rel).parts
    return f"{parts[0]}/{parts[-1]}" if len(parts) == 3 and parts[0] == "val" else rel


LAYOUTS: dict[str, Callable[[str], str]] = {
    "as_listed": _as_listed,
    "places365": _places365,
    "flat_val": _flat_val,
}


def resolve_layout(root: Path, paths: tuple[str, ...], source: str) -> tuple[str, tuple[str, ...]]:
    """Finds the on-disk layout of a split by probing its first entry and maps every path to it.

    Returns:
        (layout name, mapped relative paths).

    Raises:
        FileNotFoundError: no layout of LAYOUTS finds the first image (the message lists the places tried).
    """
    tried = []
    for name, mapping in LAYOUTS.items():
        candidate = root / mapping(paths[0])
        if candidate.is_file():
            return name, paths if name == "as_listed" else tuple(mapping(p) for p in paths)
        tried.append(str(candidate))
    msg = f"{source}: first image not found under {root}; tried: {', '.join(tried)}"
    raise FileNotFoundError(msg)


def draw_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded draw of ``k`` indices per class (all of a class with fewer), sorted, int64."""
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def class_names_from_paths(paths: tuple[str, ...], labels: np.ndarray, num_classes: int) -> tuple[str, ...]:
    """Each class's folder name (``train/<name>/file``) from its first listed image, else the class id."""
    names = [str(c) for c in range(num_classes)]
    seen = set()
    for path, label in zip(paths, labels.tolist(), strict=True):
        parts = PurePosixPath(path).parts
        if label not in seen and len(parts) >= 2:
            names[label] = parts[-2]
            seen.add(label)
    return tuple(names)


def _list_path(root: Path, name: str, key: str) -> Path:
    if not name:
        msg = f"data.{key} must name a split file for the 'splits' dataset"
        raise ValueError(msg)
    path = Path(name)
    # A relative list path is taken from the working directory, else from the image root.
    return path if path.is_absolute() or path.exists() else root / path


def _file_split(root: Path, list_file: Path) -> tuple[FileSplit, str, tuple[str, ...]]:
    """The split with paths mapped to the on-disk layout, the layout name and the paths as listed."""
    paths, labels = parse_split_file(list_file)
    layout, mapped = resolve_layout(root, paths, str(list_file))
    return FileSplit(root, mapped, labels), layout, paths


@DATASETS.register("splits")
def build_splits(cfg: DataConfig, seed: int) -> DataBundle:
    """Image root + train/val/test split files; meta/val = ``cfg.meta_per_class`` per class from the val list.

    Args:
        cfg: uses root, train_list, val_list, test_list and meta_per_class.
        seed: seeds the meta/val draw (SPEC §3).

    Returns:
        A bundle of FileSplits with ImageNet-style augmentation and normalisation; ``info`` records the chosen
        val-list indices, the remaining ("selection") indices and the detected layouts.
    """
    root = Path(cfg.root)
    lists = {key: _list_path(root, getattr(cfg, key), key) for key in ("train_list", "val_list", "test_list")}
    train, train_layout, listed = _file_split(root, lists["train_list"])
    full_val, val_layout, _ = _file_split(root, lists["val_list"])
    test, test_layout, _ = _file_split(root, lists["test_list"])
    num_classes = int(max(s.labels.max() for s in (train, full_val, test))) + 1
    meta_idx = draw_per_class(full_val.labels, cfg.meta_per_class, seed)
    rest = np.setdiff1d(np.arange(len(full_val)), meta_idx)
    info = {
        "seed": seed,
        "lists": {k: str(v) for k, v in lists.items()},
        "layouts": {"train": train_layout, "val": val_layout, "test": test_layout},
        "meta_per_class": cfg.meta_per_class,
        "meta_indices": meta_idx.tolist(),
        "selection_indices": rest.tolist(),
    }
    return DataBundle(
        train=train,
        val=full_val.subset(meta_idx),
        test=test,
        num_classes=num_classes,
        class_names=class_names_from_paths(listed, train.labels, num_classes),
        augment="imagenet",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        info=info,
    )
