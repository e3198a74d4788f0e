"""Config tree: presets, dotted overrides, validation errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dnet_fast.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    preset_names,
)
from dnet_fast.models import build_model
from dnet_fast.plugins import check_names

# Presets and the parameter count of the model each one builds (num_classes from the dataset it targets).
PRESET_MODELS = {
    "cifar100_lt_r32_ir100": 100,
    "cifar100_lt_r32_ir100_bs": 100,
    "cifar10_lt_r32_ir100": 10,
    "demo": 10,
    "imagenet_lt_r10": 1000,
    "imagenet_lt_r50": 1000,
    "imagenet_lt_r50_bs": 1000,
    "places_lt_r152": 365,
}


def test_every_preset_is_covered():
    # Stage-2 presets (*_stage2: a stage2 section only) are checked in tests/test_stage2.py.
    assert sorted(PRESET_MODELS) == [name for name in preset_names() if not name.endswith("_stage2")]


@pytest.mark.parametrize("name", sorted(PRESET_MODELS))
def test_preset_loads_validates_and_builds(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, pretrained=""), PRESET_MODELS[name])
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, PRESET_MODELS[name])


def test_preset_model_sizes_match_golden():
    # Golden counts: ResNet-32 on CIFAR-100 (SPEC §6.1 ≈ 0.47 M), torchvision ResNet-50 backbone + cosine head.
    cfg = load_config("imagenet_lt_r50")
    with torch.device("meta"):
        model = build_model(cfg.model, 1000)
    # torchvision resnet50: 25,557,032 with a biased fc; the cosine head has no bias (−1000).
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 1000


def test_round_trip_dict_and_yaml():
    cfg = load_config("places_lt_r152", ["optim.lr=0.02", "meta.lambda_dr=0.6"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert "lambda_dr: 0.6" in dump_yaml(cfg)
    assert cfg.optim.milestones == (9, 19)


def test_overrides_parse_types():
    cfg = apply_overrides(TrainConfig(), ["optim.milestones=[3,5]", "optim.nesterov=true", "run.seed=7"])
    assert cfg.optim.milestones == (3, 5)
    assert cfg.optim.nesterov is True
    assert cfg.run.seed == 7


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("meta.lambda_dr=-0.1", "meta.lambda_dr"),
        ("data.imbalance=0.5", "data.imbalance"),
        ("optim.batch_size=0", "optim.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("optim.epochs=0", "optim.epochs"),
        ("meta.meta_batch=0", "meta.meta_batch"),
        ("diffnet.hidden=0", "diffnet.hidden"),
        ("optim.milestones=[5,3]", "optim.milestones"),
        ("optim.nesterov=true", "optim.nesterov"),  # with momentum 0 below
        ("run.precision=fp8", "run.precision"),
        ("optim.batch_size=abc", "optim.batch_size"),
        ("optim.batch_size=2.5", "optim.batch_size"),
    ],
)
def test_bad_values_are_rejected(override, message):
    extra = ["optim.momentum=0"] if "nesterov" in override else []
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(None, [*extra, override])


@pytest.mark.parametrize(
    ("override", "valid"),
    [
        ("loss.name=cross_entropy", "balanced_softmax"),
        ("model.backbone=resnet9000", "resnet152"),
        ("meta.mode=magic", "exact"),
        ("data.dataset=imagenet", "synthetic"),
        ("model.head=arcface", "cosine"),
        ("meta.grad=finite_differences", "double_backward"),
        ("optim.schedule=linear", "cosine"),
        ("data.loader=fast", "auto"),
    ],
)
def test_unknown_names_list_the_valid_ones(override, valid):
    cfg = load_config(None, [override])  # the schema is fine; the registries know the names
    with pytest.raises(ValueError, match=valid):
        check_names(cfg)


def test_unknown_keys_and_presets():
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown config section"):
        load_config(None, ["optimizer.lr=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["lr=1"])
    with pytest.raises(ValueError, match="unknown preset 'nope'.*demo"):
        load_config("nope")
