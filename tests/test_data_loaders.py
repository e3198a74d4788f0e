"""Loaders: resident vs naive equality, determinism, epoch coverage, eval passes, file splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dnet_fast import sampling
from dnet_fast.config import DataConfig
from dnet_fast.data import DATASETS, LOADERS, DataBundle, FileSplit, LoaderSpec, TensorSplit
from dnet_fast.data.loaders import eval_batches, make_loader, resolve_loader


@pytest.fixture(scope="module")
def bundle():
    return DATASETS.get("synthetic")(DataConfig(num_classes=5, max_count=40, imbalance=10, image_size=8), 0)


def _spec(bundle, **kw):
    return LoaderSpec.for_bundle(bundle, kw.pop("batch_size", 16), seed=kw.pop("seed", 3), **kw)


def _collect(loader, epoch, **kw):
    return [(x.clone(), y.clone()) for x, y in loader.batches(epoch, **kw)]


def test_registry_and_default(bundle):
    assert {"naive", "resident"} <= set(LOADERS.names())
    assert resolve_loader("auto", bundle, _spec(bundle)) == "resident"
    assert type(make_loader("auto", bundle.train, _spec(bundle), bundle)).__name__ == "ResidentLoader"
    with pytest.raises(ValueError, match="needs the bundle"):
        make_loader("auto", bundle.train, _spec(bundle))


def test_shapes_length_and_drop_last(bundle):
    loader = LOADERS.get("resident")(bundle.train, _spec(bundle))
    n = len(bundle.train)  # 85
    assert len(loader) == n // 16
    batches = _collect(loader, 0)
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.shape == (16, 3, 8, 8)
        assert x.dtype == torch.float32
        assert y.shape == (16,)
        assert y.dtype == torch.int64


def test_order_comes_from_epoch_order(bundle):
    spec = _spec(bundle, augment="none")
    loader = LOADERS.get("resident")(bundle.train, spec)
    order = sampling.epoch_order(bundle.train.labels, "uniform", seed=3, epoch=2)
    ys = torch.cat([y for _, y in loader.batches(2)]).numpy()
    assert np.array_equal(ys, bundle.train.labels[order[: len(ys)]])
    # Each training sample at most once per epoch; uniform order covers all but the dropped tail.
    assert len(np.unique(order[: len(ys)])) == len(ys)


@pytest.mark.parametrize("name", ["resident", "naive"])
def test_deterministic_and_epoch_dependent(bundle, name):
    a = _collect(LOADERS.get(name)(bundle.train, _spec(bundle)), 1)
    b = _collect(LOADERS.get(name)(bundle.train, _spec(bundle)), 1)
    c = _collect(LOADERS.get(name)(bundle.train, _spec(bundle)), 2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, c, strict=True))
    d = _collect(LOADERS.get(name)(bundle.train, _spec(bundle, seed=4)), 1)
    assert not torch.equal(a[0][0], d[0][0])


def test_resident_and_naive_are_bit_identical(bundle):
    spec = _spec(bundle)
    resident = _collect(LOADERS.get("resident")(bundle.train, spec), 5)
    naive = _collect(LOADERS.get("naive")(bundle.train, spec), 5)
    for (x1, y1), (x2, y2) in zip(resident, naive, strict=True):
        assert torch.equal(y1, y2)
        assert torch.equal(x1, x2)


def test_naive_with_a_worker_process(bundle):
    spec = _spec(bundle, workers=1, batch_size=40)
    naive = _collect(LOADERS.get("naive")(bundle.train, spec), 0)
    resident = _collect(LOADERS.get("resident")(bundle.train, spec), 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(naive, resident, strict=True))


def test_mid_epoch_start_resumes_the_same_batches(bundle):
    loader = LOADERS.get("resident")(bundle.train, _spec(bundle))
    full, tail = _collect(loader, 3), _collect(loader, 3, start=2)
    assert len(tail) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], tail, strict=True))


def test_ranks_split_the_epoch(bundle):
    specs = [_spec(bundle, augment="none", batch_size=4, rank=r, world_size=2) for r in range(2)]
    loaders = [LOADERS.get("resident")(bundle.train, s) for s in specs]
    assert len(loaders[0]) == len(loaders[1]) == (len(bundle.train) + 1) // 2 // 4


@pytest.mark.parametrize("batch_size", [7, 25, 1000])
def test_eval_batches_every_sample_once_in_order(bundle, batch_size):
    xs, ys = zip(*eval_batches(bundle.test, bundle, batch_size, "cpu"), strict=True)
    assert torch.equal(torch.cat(ys), torch.from_numpy(bundle.test.labels))
    x = torch.cat(xs)
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    expected = (bundle.test.images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)


def test_eval_mode_loaders_keep_the_partial_batch(bundle):
    spec = _spec(bundle, train=False, batch_size=16)
    for name in ("resident", "naive"):
        loader = LOADERS.get(name)(bundle.test, spec)
        ys = torch.cat([y for _, y in loader.batches(0)])
        assert len(loader) == -(-len(bundle.test) // 16)
        assert torch.equal(ys, torch.from_numpy(bundle.test.labels))


# ----------------------------------------------------------------------------------------------------------
# File splits (ImageNet-style): decode once for resident, per image for naive.


@pytest.fixture(scope="module")
def file_bundle(tmp_path_factory) -> DataBundle:
    root = tmp_path_factory.mktemp("files")
    rng = np.random.Generator(np.random.PCG64(0))
    paths, labels = [], []
    for i in range(10):
        h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
        rel = f"train/c{i % 3}/{i}.png"  # PNG: lossless, so decoded pixels are known exactly
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
        paths.append(rel)
        labels.append(i % 3)
    split = FileSplit(Path(root), tuple(paths), np.array(labels))
    return DataBundle(split, split, split, 3, ("a", "b", "c"), "imagenet", (0.5,) * 3, (0.25,) * 3)


def test_file_split_eval_identical_between_loaders(file_bundle):
    spec = LoaderSpec.for_bundle(file_bundle, 4, train=False, crop_size=8)
    resident = _collect(LOADERS.get("resident")(file_bundle.train, spec), 0)
    naive = _collect(LOADERS.get("naive")(file_bundle.train, spec), 0)
    assert [len(y) for _, y in resident] == [4, 4, 2]
    for (x1, y1), (x2, y2) in zip(resident, naive, strict=True):
        assert torch.equal(y1, y2)
        assert torch.equal(x1, x2)
    assert resolve_loader("auto", file_bundle, spec) == "resident"  # small: decoded once, no decoding per epoch


def test_file_split_decode_error_names_the_file(tmp_path):
    from dnet_fast.data.base import SampleError

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    rng = np.random.Generator(np.random.PCG64(0))
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:1000])  # header intact, pixel data cut
    split = FileSplit(tmp_path, ("good.png", "bad.png"), np.array([0, 1]))
    assert split.image(0).size == (32, 32)
    with pytest.raises(SampleError, match=f"^{bad}: "):
        split.image(1)


def test_file_split_train_batches(file_bundle):
    spec = LoaderSpec.for_bundle(file_bundle, 4, crop_size=8, seed=1)
    for name in ("resident", "naive"):
        batches = _collect(LOADERS.get(name)(file_bundle.train, spec), 0)
        assert len(batches) == 2
        assert batches[0][0].shape == (4, 3, 8, 8)
        assert torch.isfinite(batches[0][0]).all()


def test_resident_rejects_unknown_split_types():
    with pytest.raises(TypeError, match="TensorSplit or FileSplit"):
        LOADERS.get("resident")(object(), LoaderSpec(batch_size=2))
    with pytest.raises(ValueError, match="augment"):
        LoaderSpec(batch_size=2, augment="mixup")


def test_eval_family_follows_augment():
    assert LoaderSpec(batch_size=1, augment="imagenet").eval_augment == "imagenet"
    assert LoaderSpec(batch_size=1, augment="none").eval_augment == "cifar"
    assert LoaderSpec(batch_size=1, augment="none", eval_augment="imagenet").family == "imagenet"


def test_tensor_split_validates():
    with pytest.raises(ValueError, match="uint8"):
        TensorSplit(torch.zeros(2, 4, 4, 3), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        TensorSplit(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), np.zeros(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["resident", "naive"])
def test_cuda_batches_match_cpu(bundle, file_bundle, name):
    for b, crop in ((bundle, 224), (file_bundle, 8)):
        cpu = _collect(LOADERS.get(name)(b.train, LoaderSpec.for_bundle(b, 4, seed=2, crop_size=crop)), 1)
        spec = LoaderSpec.for_bundle(b, 4, seed=2, crop_size=crop, device="cuda")
        gpu = _collect(LOADERS.get(name)(b.train, spec), 1)
        for (x1, y1), (x2, y2) in zip(cpu, gpu, strict=True):
            assert x2.device.type == "cuda"
            assert torch.equal(y1, y2.cpu())
            assert torch.allclose(x1, x2.cpu(), atol=1e-4)


def _shard_bundle(file_bundle, beton):
    from dnet_fast.data.shards import ShardSplit

    src = file_bundle.train
    rows = np.arange(len(src), dtype=np.int64)
    train = ShardSplit(src.root, src.paths, src.labels, "train", ("train-000000.tar",), beton, rows)
    return DataBundle(train, src, src, 3, ("a", "b", "c"), "imagenet", (0.5,) * 3, (0.25,) * 3)


def test_auto_picks_the_fastest_loader_that_fits(file_bundle, monkeypatch):
    from dnet_fast.data import loaders

    spec = LoaderSpec.for_bundle(file_bundle, 4, crop_size=8)
    assert loaders.resolve_loader("auto", file_bundle, spec) == "resident"
    assert loaders.resolve_loader("naive", file_bundle, spec) == "naive"
    monkeypatch.setattr(loaders, "RESIDENT_SHARE", 0.0)  # as if the decoded set did not fit in memory
    with_beton, tars_only = _shard_bundle(file_bundle, "train.beton"), _shard_bundle(file_bundle, None)
    available = {"ffcv", "nvidia.dali"}
    monkeypatch.setattr(loaders, "_importable", lambda module: module in available)
    assert [loaders.resolve_loader("auto", b, spec) for b in (with_beton, tars_only, file_bundle)] == [
        "ffcv", "dali", "naive"
    ]
    available.discard("ffcv")
    assert loaders.resolve_loader("auto", with_beton, spec) == "dali"
    available.clear()
    assert loaders.resolve_loader("auto", with_beton, spec) == "naive"


def test_resident_bytes_of_a_file_split(file_bundle):
    from dnet_fast.data.loaders import resident_bytes
    from dnet_fast.data.transforms import eval_size

    spec = LoaderSpec.for_bundle(file_bundle, 4, crop_size=8)
    assert resident_bytes(file_bundle.train, spec) == 10 * eval_size(8) ** 2 * 3


def test_auto_workers_leave_the_training_threads_their_cores(monkeypatch):
    from dnet_fast.config import TrainConfig
    from dnet_fast.data import loaders

    assert TrainConfig().data.workers == -1  # the default is the rule below
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert (loaders.loader_workers(-1, cpu), loaders.loader_workers(-1, cuda)) == (2, 7)
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert loaders.loader_workers(-1, cpu) == 1  # never 0: the step would decode in its own thread
    assert (loaders.loader_workers(0, cpu), loaders.loader_workers(3, cpu)) == (0, 3)
