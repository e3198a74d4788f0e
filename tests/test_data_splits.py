"""Split-list datasets: parsing errors, golden statistics of the real split files, a miniature image tree."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dnet_fast.config import DataConfig
from dnet_fast.data import DATASETS, FileSplit, eval_batches
from dnet_fast.data.groups import group_sizes
from dnet_fast.data.splits import draw_per_class, parse_split_file, parse_split_lines
from tests.places_tree import SPLITS_DIR, needs_splits

SPLITS = SPLITS_DIR

# file: (lines, classes, per-class max, per-class min, git blob id) — SPEC §9
GOLDEN = {
    "Places_LT_train.txt": (62500, 365, 4980, 5, "6392252f8ae867bc8a5e841cc1b29e5b8ef4b636"),
    "Places_LT_val.txt": (7300, 365, 20, 20, "b93a2ca58ccb7f3b671c176f395a70bf52c95533"),
    "Places_LT_test.txt": (36500, 365, 100, 100, "e732e58b8aa718a2c1c11933375f5710652c2b93"),
    "ImageNet_LT_val.txt": (20000, 1000, 20, 20, "3ed3188b2f44829ce2dec1cc27040d8d40984088"),
    "ImageNet_LT_test.txt": (50000, 1000, 50, 50, "76a2fb9749d6cd29e765cc4f8c270f2504131e2f"),
}


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["a/b.jpg 0", "just_a_path.jpg"], r"list\.txt:2: expected"),
        (["a/b.jpg 0", "", "a/c.jpg zero"], r"list\.txt:3: label 'zero' is not an integer"),
        (["a/b.jpg -1"], r"list\.txt:1: label -1 is negative"),
        (["a/b.jpg 1.5"], r"list\.txt:1: label '1.5' is not an integer"),
        ([""], r"list\.txt: no entries"),
    ],
)
def test_bad_lines_name_file_and_line(lines, match):
    with pytest.raises(ValueError, match=match):
        parse_split_lines(lines, "list.txt")


def test_bad_line_in_a_real_file(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("x/1.jpg 0\nx/2.jpg 0 extra\n")
    with pytest.raises(ValueError, match=rf"{f}:2: label 'extra'"):
        parse_split_file(f)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        parse_split_file(tmp_path / "missing.txt")


def test_parse_keeps_order_and_skips_blank_lines():
    paths, labels = parse_split_lines(["train/a/1.jpg 3", "", "  train/b/2.jpg   0  "], "f")
    assert paths == ("train/a/1.jpg", "train/b/2.jpg")
    assert labels.tolist() == [3, 0]
    assert labels.dtype == np.int64


@needs_splits
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_split_statistics(name):
    lines, classes, most, fewest, blob = GOLDEN[name]
    raw = (SPLITS / name).read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest() == blob  # git hash-object
    paths, labels = parse_split_file(SPLITS / name)
    counts = np.bincount(labels)
    assert (len(paths), len(counts), counts.max(), counts.min()) == (lines, classes, most, fewest)


@needs_splits
def test_places_shot_groups():
    _, labels = parse_split_file(SPLITS / "Places_LT_train.txt")
    counts = np.bincount(labels, minlength=365)
    assert group_sizes(counts) == {"many": 131, "medium": 163, "few": 71}
    assert int((counts == 20).sum()) == 6  # exactly 20 → medium


def test_draw_per_class_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [20, 20, 20, 3])
    a, b, c = draw_per_class(labels, 10, 0), draw_per_class(labels, 10, 0), draw_per_class(labels, 10, 1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [10, 10, 10, 3]


# ----------------------------------------------------------------------------------------------------------
# A miniature Places-LT tree built from the real split lines of a few classes.

CLASSES = (88, 126, 195)  # three 5-image tail classes of Places-LT


def _write_jpeg(path: Path, seed: int) -> None:
    rng = np.random.Generator(np.random.PCG64(seed))
    w, h = 10 + seed % 7, 8 + seed % 5  # varied sizes and aspect ratios
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def _mini_tree(root: Path, layout=lambda p: p) -> dict[str, list[str]]:
    kept = {}
    for split in ("train", "val", "test"):
        lines = (SPLITS / f"Places_LT_{split}.txt").read_text().splitlines()
        kept[split] = [ln for ln in lines if int(ln.split()[1]) in CLASSES]
        (root / f"{split}.txt").write_text("\n".join(kept[split]) + "\n")
        for i, ln in enumerate(kept[split]):
            _write_jpeg(root / layout(ln.split()[0]), seed=i)
    return kept


def _cfg(root: Path) -> DataConfig:
    return DataConfig(
        dataset="splits",
        root=str(root),
        train_list=str(root / "train.txt"),
        val_list=str(root / "val.txt"),
        test_list=str(root / "test.txt"),
        meta_per_class=10,
        crop_size=8,
    )


@needs_splits
def test_miniature_places_tree(tmp_path):
    kept = _mini_tree(tmp_path)
    b = DATASETS.get("splits")(_cfg(tmp_path), 0)
    assert isinstance(b.train, FileSplit)
    assert b.augment == "imagenet"
    assert b.num_classes == max(CLASSES) + 1
    assert [f"{p} {y}" for p, y in zip(b.train.paths, b.train.labels.tolist(), strict=True)] == kept["train"]
    assert b.class_counts[list(CLASSES)].tolist() == [5, 5, 5]
    assert np.bincount(b.test.labels)[list(CLASSES)].tolist() == [100, 100, 100]
    assert np.bincount(b.val.labels)[list(CLASSES)].tolist() == [10, 10, 10]  # 10 of the 20 per class
    meta = np.asarray(b.info["meta_indices"])
    val_lines = [ln.split()[0] for ln in kept["val"]]
    assert list(b.val.paths) == [val_lines[i] for i in meta]
    assert len(np.intersect1d(meta, b.info["selection_indices"])) == 0
    assert b.class_names[88] == kept["train"][0].split("/")[1]
    assert b.class_names[0] == "0"
    xs = [x for x, _ in eval_batches(b.val, b, 7, "cpu", crop_size=8)]
    assert sum(len(x) for x in xs) == 30
    assert xs[0].shape[1:] == (3, 8, 8)


def _places365(rel: str) -> str:
    split, category, name = rel.split("/")
    return (
        f"val_256/{name}" if split == "val" else f"data_256/{category[0]}/{category.replace('-', '/')}/{name}"
    )


@needs_splits
def test_places365_layout_is_detected(tmp_path):
    _mini_tree(tmp_path, layout=_places365)
    b = DATASETS.get("splits")(_cfg(tmp_path), 0)
    assert b.info["layouts"] == {"train": "places365", "val": "places365", "test": "places365"}
    assert all(b.train.path(i).is_file() for i in range(len(b.train)))
    assert b.test.paths[0].startswith("val_256/Places365_val_")


def test_missing_images_name_the_places_tried(tmp_path):
    (tmp_path / "l.txt").write_text("train/a/1.jpg 0\n")
    cfg = DataConfig(root=str(tmp_path), train_list="l.txt", val_list="l.txt", test_list="l.txt")
    with pytest.raises(FileNotFoundError, match="first image not found.*data_256"):
        DATASETS.get("splits")(cfg, 0)
    with pytest.raises(ValueError, match="data.val_list"):
        DATASETS.get("splits")(DataConfig(root=str(tmp_path), train_list="l.txt"), 0)
