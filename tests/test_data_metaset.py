"""MetaSet: eval-transformed meta images on the device and seeded meta batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dnet_fast.config import DataConfig
from dnet_fast.data import DATASETS, MetaSet, eval_batches
from dnet_fast.data.metaset import shuffle_indices
from dnet_fast.sampling import MetaBatchSampler


@pytest.fixture(scope="module")
def bundle():
    return DATASETS.get("synthetic")(
        DataConfig(num_classes=6, max_count=30, val_per_class=5, image_size=8), 0
    )


def test_images_are_the_eval_transform(bundle):
    meta = MetaSet(bundle.val, bundle, device="cpu", seed=0)
    x = torch.cat([x for x, _ in eval_batches(bundle.val, bundle, 7, "cpu")])
    assert torch.equal(meta.images, x)
    assert meta.images.shape == (30, 3, 8, 8)
    assert len(meta) == 30
    assert meta.indices.tolist() == list(range(30))  # generated data: no source positions recorded


def test_balanced_batches_follow_the_sampler(bundle):
    meta = MetaSet(bundle.val, bundle, device="cpu", seed=4)
    ref = MetaBatchSampler(bundle.val.labels, 6, seed=4)
    for step in (0, 1, 17):
        x, y = meta.batch(step, 6)
        idx = ref.batch(step, 6)
        assert torch.equal(x, meta.images[idx])
        assert sorted(y.tolist()) == list(range(6))


def test_batches_are_pure_functions_of_seed_and_step(bundle):
    a = MetaSet(bundle.val, bundle, device="cpu", seed=1)
    b = MetaSet(bundle.val, bundle, device="cpu", seed=1)
    c = MetaSet(bundle.val, bundle, device="cpu", seed=2)
    assert torch.equal(a.batch(5, 12)[0], b.batch(5, 12)[0])
    assert not torch.equal(a.batch(5, 12)[1], a.batch(6, 12)[1])
    assert not torch.equal(a.batch(5, 12)[1], c.batch(5, 12)[1])


def test_shuffle_passes_cover_the_set(bundle):
    meta = MetaSet(bundle.val, bundle, device="cpu", seed=3, sampler="shuffle")
    first_pass = np.concatenate([meta.batch_indices(s, 10) for s in range(3)])
    assert sorted(first_pass.tolist()) == list(range(30))
    second_pass = np.concatenate([meta.batch_indices(s, 10) for s in range(3, 6)])
    assert sorted(second_pass.tolist()) == list(range(30))
    assert not np.array_equal(first_pass, second_pass)


def test_shuffle_batches_wrap_across_passes():
    idx = shuffle_indices(10, 0, 2, 4)  # stream positions 8..11: two from pass 0, two from pass 1
    p0 = np.random.Generator(np.random.PCG64([0, 0])).permutation(10)
    p1 = np.random.Generator(np.random.PCG64([0, 1])).permutation(10)
    assert idx.tolist() == [*p0[8:].tolist(), *p1[:2].tolist()]
    assert len(shuffle_indices(3, 0, 0, 8)) == 8  # m larger than the set


def test_unknown_sampler(bundle):
    with pytest.raises(ValueError, match="balanced, shuffle"):
        MetaSet(bundle.val, bundle, device="cpu", seed=0, sampler="random")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_metaset(bundle):
    meta = MetaSet(bundle.val, bundle, device="cuda", seed=0)
    x, y = meta.batch(3, 6)
    cpu = MetaSet(bundle.val, bundle, device="cpu", seed=0).batch(3, 6)
    assert x.device.type == "cuda"
    assert torch.equal(y.cpu(), cpu[1])
    assert torch.allclose(x.cpu(), cpu[0], atol=1e-6)


def test_indices_come_from_the_bundle_info(bundle):
    recorded = dataclasses.replace(bundle, info={**bundle.info, "meta_indices": list(range(100, 130))})
    assert MetaSet(recorded.val, recorded, device="cpu", seed=0).indices.tolist() == list(range(100, 130))
    assert MetaSet(recorded.test, recorded, device="cpu", seed=0).indices.tolist() == list(
        range(len(bundle.test))
    )
