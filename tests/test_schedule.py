"""Learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dnet_fast.config import OptimConfig
from dnet_fast.schedule import apply_lr, lr_factor


def test_ldam_drw_step_recipe():
    cfg = OptimConfig(epochs=200, lr=0.1, warmup_epochs=5, milestones=(161, 181), gamma=0.01)
    assert [lr_factor(e, cfg) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(160, cfg) == 1.0
    assert lr_factor(161, cfg) == pytest.approx(0.01)
    assert lr_factor(199, cfg) == pytest.approx(1e-4)


def test_cosine_matches_official_imagenet_formula():
    cfg = OptimConfig(epochs=180, lr=0.05, schedule="cosine")
    for e in (0, 17, 90, 179):
        # official: lr(e) = 0.025 (1 + cos(π e / 180))
        assert 0.05 * lr_factor(e, cfg) == pytest.approx(0.025 * (1 + math.cos(math.pi * e / 180)))


def test_places_step_and_group_lrs():
    cfg = OptimConfig(epochs=30, lr=0.01, milestones=(9, 19), gamma=0.1)
    p1, p2 = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.001}, {"params": [p2], "lr": 0.01}], lr=0.01)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    apply_lr(opt, lr_factor(19, cfg))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-4])


def test_tensor_lr_updated_in_place():
    p = torch.nn.Parameter(torch.ones(1))
    lr = torch.tensor(0.1)
    opt = torch.optim.SGD([p], lr=lr)
    opt.param_groups[0]["base_lr"] = 0.1
    apply_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(0.05)
