"""Shared fixtures: a tiny training configuration that runs in seconds on one CPU core."""

from __future__ import annotations

import pytest
import torch

# Tests compare numbers bit for bit; one thread keeps CPU reductions in a fixed order and the 2-core box calm.
torch.set_num_threads(1)

TINY_OVERRIDES = (
    "data.dataset=synthetic",
    "data.num_classes=5",
    "data.max_count=40",
    "data.imbalance=10",
    "data.image_size=8",
    "data.val_per_class=4",
    "data.test_per_class=6",
    "model.backbone=resnet20",
    "model.width=4",
    "optim.epochs=2",
    "optim.batch_size=16",
    "optim.lr=0.05",
    "optim.schedule=cosine",
    "meta.meta_batch=10",
    "diffnet.hidden=8",
    "diffnet.lr=0.01",
    "diffnet.init_acc=eval",
    "run.progress=false",
    "run.tensorboard=false",
    "run.log_every=2",
)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a 2-epoch run on a 5-class synthetic set, writing into a temporary run directory."""
    return [*TINY_OVERRIDES, f"run.out_dir={tmp_path / 'run'}"]


@pytest.fixture
def deterministic_cudnn():
    """Graph and eager must pick the same cuDNN algorithms; restored afterwards for other test files."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
