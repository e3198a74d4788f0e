"""Loaders over converted shards: labels and order through every loader, identical eval outputs, training runs."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import dnet_fast.data.dali_loader
import dnet_fast.data.ffcv_loader
import dnet_fast.data.shards  # noqa: F401  (registers the shards dataset and the ffcv/dali loaders)
from dnet_fast import sampling
from dnet_fast.config import DataConfig
from dnet_fast.data.base import DATASETS, LOADERS, LoaderSpec, SampleError
from dnet_fast.data.shards import ShardSplit, load_meta, open_split
from dnet_fast.shardformat import ShardDataError, ShardReader, read_index, read_meta, sample_sources
from dnet_fast.shardverify import RECORD_NAME, ShardIntegrityError, verify_checksums
from tests.places_tree import converted_tree

LOADER_NAMES = ("resident", "naive", "ffcv", "dali")
CROP = 56  # eval resizes the shorter side to 64 = the stored images' shorter side: no resampling anywhere


def _needs(name: str) -> None:
    if name == "ffcv":
        pytest.importorskip("ffcv")
    if name == "dali":
        pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The miniature Places-LT tree converted losslessly (PNG shards, raw .beton when ffcv is installed)."""
    return converted_tree(tmp_path_factory.mktemp("places"), max_side=80)


def _copy(shards, tmp_path):
    """A private copy of the converted directory (the module's one is shared), without its verification record."""
    return shutil.copytree(shards, tmp_path / "copy", ignore=shutil.ignore_patterns(RECORD_NAME))


def _image_offset(root, tar: str) -> int:
    """Offset in ``tar`` of its first sample's image bytes (from the index)."""
    first = read_index((root / tar).with_suffix(".idx"))[0]
    return next(off for ext, (off, _) in first.items() if ext != "cls")


def _overwrite(path, offset: int, data: bytes, *, keep_mtime: bool = False) -> None:
    """Overwrites bytes in place: same size; ``keep_mtime`` sets the old mtime back (only the ctime then changes)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _train_args(data, run, loader: str = "resident") -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--loader",
        loader,
        "--backbone",
        "resnet20",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(run),
        "--device",
        "cpu",
        "meta.mode='off'",  # quoted: YAML reads a bare off as False; overrides go last
        f"data.crop_size={CROP}",
        "model.width=4",
        "data.meta_per_class=2",
        "data.workers=1",
        "run.progress=false",
        "run.tensorboard=false",
        "run.eval_batch=16",
    ]


def _spec(**kw) -> LoaderSpec:
    base = {
        "augment": "none",
        "eval_augment": "imagenet",
        "crop_size": CROP,
        "workers": 1,
        "seed": 3,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    return LoaderSpec(**{"batch_size": 8, **base, **kw})


def _run(name: str, split: ShardSplit, spec: LoaderSpec, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*LOADERS.get(name)(split, spec).batches(epoch), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_shards_dataset_reads_meta_and_draws_the_meta_set(shards):
    bundle = DATASETS.get("shards")(DataConfig(dataset="shards", root=str(shards), meta_per_class=2), 0)
    meta = load_meta(shards)
    assert bundle.num_classes == 5
    assert bundle.class_names[0] == "airfield"
    assert bundle.class_counts.tolist() == meta["class_counts"]["train"]
    assert np.bincount(bundle.val.labels).tolist() == [2] * 5  # 2 per class drawn from the stored val split
    assert len(bundle.test) == meta["splits"]["test"]["images"]
    assert bundle.info["meta_indices"] == sorted(bundle.info["meta_indices"])
    (shards.parent / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_meta(shards.parent / "empty")


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_engine_order_labels_and_identical_eval_pixels(shards, name):
    _needs(name)
    train = open_split(shards, "train")
    # Training order from sampling.epoch_order with the deterministic eval transform: one loader checks the
    # order, the labels and the pixels (FFCV compiles a pipeline per loader, so each loader is built once).
    spec = _spec(train=True, order="class_aware")
    x, y = _run(name, train, spec)
    order = sampling.epoch_order(train.labels, "class_aware", seed=3, epoch=1)[: len(y)]
    assert y.tolist() == train.labels[order].tolist()
    ref, _ = _run("resident", train.subset(order), _spec(train=False))
    assert x.shape == (len(order), 3, CROP, CROP)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("name", ["naive", "dali"])
def test_eval_mode_reads_every_sample_once_in_file_order(shards, name):
    _needs(name)
    test = open_split(shards, "test")
    x, y = _run(name, test, _spec(train=False, batch_size=4))
    assert y.tolist() == test.labels.tolist()
    assert torch.equal(x, _run("resident", test, _spec(train=False))[0])


@pytest.mark.parametrize("name", ["resident", "naive", "dali"])
def test_train_augmentation_batches(shards, name):
    _needs(name)
    train = open_split(shards, "train")
    x, y = _run(name, train, _spec(train=True, augment="imagenet"))
    assert x.shape == (len(train) // 8 * 8, 3, CROP, CROP)
    assert torch.isfinite(x).all()
    assert sorted(y.tolist()) != y.tolist()  # shuffled


def test_dali_webdataset_reader_reads_the_index_files(shards):
    pytest.importorskip("nvidia.dali")
    from dnet_fast.data.dali_loader import read_webdataset_labels

    val = open_split(shards, "val")
    assert read_webdataset_labels(val, batch_size=4).tolist() == val.labels.tolist()


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_train_cli_runs_from_shards(shards, tmp_path, name):
    _needs(name)
    from dnet_fast.cli import main

    run = tmp_path / "run"
    assert main(_train_args(shards, run, name)) == 0
    cfg = (run / "config.yaml").read_text()
    assert f"loader: {name}" in cfg
    assert "dataset: shards" in cfg
    assert json.loads(next(run.glob("results.json")).read_text())


@pytest.mark.parametrize("target", ["train-000001.tar", "train.beton"])
def test_a_flipped_byte_stops_the_run_before_anything_is_written(shards, tmp_path, capsys, target):
    root = _copy(shards, tmp_path)
    if not (root / target).exists():
        pytest.skip("no .beton without ffcv")
    from dnet_fast.cli import main

    meta = load_meta(root)  # verifies every file and records it
    first = verify_checksums(root, meta["files"])
    assert (first.files, first.hashed, first.record) == (len(meta["files"]), 0, None)  # recorded: only stat
    assert json.loads((root / RECORD_NAME).read_text())["files"].keys() == meta["files"].keys()
    path = root / target
    data = path.read_bytes()
    if target.endswith(".tar"):
        offset = _image_offset(root, target) + 100  # inside the first sample's image
    else:
        nonzero = np.flatnonzero(np.frombuffer(data, np.uint8))
        offset = int(nonzero[len(nonzero) // 2])  # inside the stored samples
    _overwrite(path, offset, bytes([data[offset] ^ 0x10]), keep_mtime=True)  # same size, same mtime
    with pytest.raises(ShardIntegrityError, match=rf"{re.escape(str(path))}: SHA-256 \w+\.\.\. differs"):
        load_meta(root)
    cfg = DataConfig(dataset="shards", root=str(root), meta_per_class=2)
    with pytest.raises(ShardIntegrityError, match=target):
        DATASETS.get("shards")(cfg, 0)
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(_train_args(root, run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dnet-fast train: error: {path}: SHA-256 ")
    assert "\n" not in err
    assert not run.exists()
    _overwrite(path, offset, data[offset : offset + 1])  # restored: verified again and accepted
    assert verify_checksums(root, meta["files"]).hashed == 1


def test_verification_record_falls_back_to_the_user_cache(shards, tmp_path, monkeypatch):
    root = _copy(shards, tmp_path)
    (root / RECORD_NAME).mkdir()  # the record's place beside the data cannot be written
    monkeypatch.setenv("DNET_FAST_CACHE", str(tmp_path / "cache"))
    files = read_meta(root)["files"]
    done = verify_checksums(root, files)
    assert done.hashed == len(files)
    assert done.hashed_bytes == sum(r["bytes"] for r in files.values())
    assert done.record is not None
    assert done.record.parent == tmp_path / "cache" / "verified"
    assert verify_checksums(root, files).hashed == 0
    assert not list(root.glob("*.tmp"))


@pytest.mark.parametrize("name", ["resident", "naive", "dali"])
def test_decode_errors_name_the_shard_and_the_sample(shards, tmp_path, name):
    _needs(name)
    root = _copy(shards, tmp_path)
    _overwrite(root / "train-000001.tar", _image_offset(root, "train-000001.tar"), bytes(16))
    split = open_split(root, "train", read_meta(root))  # a given meta is trusted: no checksum stops this
    source = sample_sources(root / "train.samples.tsv")[8]
    where = f"{root / 'train-000001.tar'}: sample 00000008 (source {source}): cannot identify image file"
    with pytest.raises(SampleError, match=f"^{re.escape(where)}$"):
        _run(name, split, _spec(train=False))


def test_damaged_tables_and_class_members_name_file_and_line(shards, tmp_path):
    root = _copy(shards, tmp_path)
    tsv = root / "train.samples.tsv"
    lines = tsv.read_bytes().split(b"\n")
    lines[3] = b"\xff" + lines[3][1:]
    tsv.write_bytes(b"\n".join(lines))
    with pytest.raises(ShardDataError, match=r"train\.samples\.tsv:4: not valid UTF-8"):
        open_split(root, "train", read_meta(root))
    first = read_index(root / "train-000000.idx")[0]
    _overwrite(root / "train-000000.tar", first["cls"][0], b"x")
    with pytest.raises(ShardDataError, match=r"train-000000\.tar: sample 00000000: class member b'x"):
        ShardReader([root / "train-000000.tar"]).labels()
