"""The split-file sets the converters expect: standard file names, golden numbers and where the public lists are.

The split files are data, not code: they are never shipped in the package, and a converter asks for them
explicitly (``--split-dir`` or one ``--<split>-list`` per split). When one is missing, :func:`resolve_lists`
says in one line where the public OLTR files come from and how they are checked (SPEC §9).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dnet_fast.convert.golden import GOLDEN, Golden

__all__ = ["IMAGENET_LT", "PLACES_LT", "SPLITS", "SplitSet", "SplitSetError", "resolve_lists"]

SPLITS = ("train", "val", "test")

_OLTR = (
    "hitachi-rd-cv/Difficulty_Net (ImageNet_Places-LT/datasets/data_txt/) and "
    "facebookresearch/classifier-balancing (data/{folder}/)"
)


class SplitSetError(ValueError):
    """A split file is not given or not found (the message says where the public lists come from)."""


@dataclass(frozen=True)
class SplitSet:
    """What a split-list converter reads.

    Attributes:
        dataset: name recorded in meta.json.
        num_classes: labels must lie below it (None: any label >= 0).
        file_names: split -> the standard file name looked up inside ``--split-dir``.
        golden: recorded statistics checked before writing (None: no check unless asked for).
        source: where the public split files come from (one clause of the error line).
    """

    dataset: str
    num_classes: int | None
    file_names: dict[str, str] = field(default_factory=dict)
    golden: Golden | None = None
    source: str = ""

    def golden_clause(self) -> str:
        """How the lists are checked, for the error line."""
        if self.golden is None:
            return "no golden check unless --golden NAME is given"
        g = self.golden
        return (
            f"before anything is written the lists are checked against the golden numbers ({g.train_images:,}/"
            f"{g.val_images:,}/{g.test_images:,} train/val/test images, {g.classes} classes, per class max "
            f"{g.train_max:,} min {g.train_min}) and the train list's git blob (git hash-object); --no-golden "
            "skips that for subsets or custom lists"
        )


PLACES_LT = SplitSet(
    "places_lt",
    365,
    {s: f"Places_LT_{s}.txt" for s in SPLITS},
    GOLDEN["places_lt"],
    "the public OLTR split files Places_LT_{train,val,test}.txt are in " + _OLTR.format(folder="Places_LT"),
)

IMAGENET_LT = SplitSet(
    "imagenet_lt",
    1000,
    {s: f"ImageNet_LT_{s}.txt" for s in SPLITS},
    GOLDEN["imagenet_lt"],
    "ImageNet_LT_val.txt and ImageNet_LT_test.txt are public OLTR split files in "
    + _OLTR.format(folder="ImageNet_LT")
    + "; the expected ImageNet_LT_train.txt has 115,846 lines and git blob "
    f"{GOLDEN['imagenet_lt'].train_blob} (in facebookresearch/classifier-balancing data/ImageNet_LT/ and "
    "dvlab-research/MiSLAS datasets/data_txt/, not in Difficulty_Net)",
)


def _usage(splitset: SplitSet) -> str:
    names = ", ".join(splitset.file_names[s] for s in SPLITS)
    return f"pass --split-dir DIR holding {names}, or --train-list/--val-list/--test-list FILE"


def resolve_lists(
    splitset: SplitSet, split_dir: str | Path | None, explicit: dict[str, str | Path | None]
) -> dict[str, Path]:
    """The three split files: ``explicit[split]`` when given, else ``split_dir / file_names[split]``.

    Raises:
        SplitSetError: a split has no file, or a named file does not exist; one line naming the split, how to
            pass the files, where the public lists come from and how they are checked.
    """
    lists: dict[str, Path] = {}
    unnamed, problems = [], []
    for split in SPLITS:
        given = explicit.get(split)
        path = Path(given) if given else Path(split_dir) / splitset.file_names[split] if split_dir else None
        if path is None:
            unnamed.append(split)
        elif not path.is_file():
            problems.append(f"{split} split file not found: {path}")
        else:
            lists[split] = path
    if unnamed:
        problems.insert(0, f"no split file for {', '.join(unnamed)}")
    if problems:
        tail = "; ".join(c for c in (splitset.source, splitset.golden_clause()) if c)
        msg = f"{'; '.join(problems)} ({_usage(splitset)}); {tail}"
        raise SplitSetError(msg)
    return lists
