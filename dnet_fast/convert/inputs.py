"""Builds a conversion input from split files (ImageNet-LT, Places-LT) or from in-memory arrays (CIFAR-LT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dnet_fast.atomic import sha256_file
from dnet_fast.convert.pipeline import DatasetInput
from dnet_fast.convert.sources import ArraySource, FileSource
from dnet_fast.convert.splitfile import (
    Problem,
    SplitFile,
    class_name_of,
    find_cross_duplicates,
    git_blob_sha1,
    read_split,
)

__all__ = ["array_input", "read_splits", "split_file_input"]


def read_splits(lists: dict[str, str | Path], num_classes: int | None) -> dict[str, SplitFile]:
    """Parses every split file (``{"train": path, "val": path, "test": path}``), in that order."""
    return {name: read_split(path, num_classes) for name, path in lists.items()}


def split_file_input(
    dataset: str,
    root: str | Path,
    splits: dict[str, SplitFile],
    layout: str = "auto",
) -> DatasetInput:
    """A conversion input from parsed split files.

    Classes are those present in the train split; when they are not exactly ``0..C-1`` (a subset of the
    classes) they are renumbered contiguously in id order and meta.json keeps the original ids. Val/test
    entries of classes without training images are bad input.

    Args:
        dataset: name recorded in meta.json.
        root: the image root the split paths are relative to.
        splits: ``read_splits`` output; must contain ``train``.
        layout: ``auto`` or a name of ``splits.LAYOUTS`` (``as_listed``, ``places365``, ``flat_val``).
    """
    root = Path(root)
    if "train" not in splits:
        msg = "split files must include a train split"
        raise ValueError(msg)
    problems = [p for s in splits.values() for p in s.problems] + find_cross_duplicates(list(splits.values()))
    dup = {p.where for p in problems if p.kind == "duplicate"}
    original = np.unique(splits["train"].labels)
    to_new = {int(o): c for c, o in enumerate(original)}
    names = _class_names(splits["train"], original)
    sources = {}
    for name, split in splits.items():
        keep, labels = [], []
        for e in split.entries:
            if e.where in dup:
                continue
            if e.label not in to_new:
                problems.append(
                    Problem("label_out_of_range", e.where, f"class id {e.label} has no training images")
                )
                continue
            keep.append(e)
            labels.append(to_new[e.label])
        sources[name] = FileSource(root, tuple(keep), np.asarray(labels, dtype=np.int64), layout)
    layouts = {name: src.layout for name, src in sources.items()}
    provenance = {"root": str(root.resolve()), "layouts": layouts, "lists": _list_info(splits)}
    return DatasetInput(
        dataset, sources, names, tuple(int(o) for o in original), "imagenet", problems, provenance
    )


def _class_names(train: SplitFile, original: np.ndarray) -> tuple[str, ...]:
    first: dict[int, str] = {}
    for e in train.entries:
        first.setdefault(e.label, class_name_of(e.path))
    return tuple(first.get(int(o)) or f"class_{int(o)}" for o in original)


def _list_info(splits: dict[str, SplitFile]) -> dict[str, dict[str, object]]:
    return {
        name: {
            "name": s.path.name,
            "path": str(s.path.resolve()),
            "sha256": sha256_file(s.path),
            "git_blob": git_blob_sha1(s.path),
            "entries": len(s.entries),
            "problems": len(s.problems),
        }
        for name, s in splits.items()
    }


def array_input(
    dataset: str,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: tuple[str, ...],
    provenance: dict[str, object] | None = None,
) -> DatasetInput:
    """A conversion input from decoded images: ``{"train": (images (N,H,W,3) uint8, labels (N,)), ...}``."""
    sources = {name: ArraySource(x, y, f"{dataset}/{name}") for name, (x, y) in arrays.items()}
    ids = tuple(range(len(class_names)))
    return DatasetInput(dataset, sources, tuple(class_names), ids, "cifar", [], dict(provenance or {}))
