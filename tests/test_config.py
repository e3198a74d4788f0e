"""Config tree: presets, dotted overrides, validation errors."""

from __future__ import annotations

import dataclasses

import numpy as np
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
    read_preset,
)
from dnet_fast.losses import build_loss
from dnet_fast.meta import build_meta_mode
from dnet_fast.models import build_model
from dnet_fast.plugins import check_names
from dnet_fast.schedule import lr_factor

R32_C100 = 470_004  # CIFAR ResNet-32, 100 classes: 464,154 for 10 classes + 90·(64 + 1) more fc parameters
D_C100 = 41_984  # Difficulty-Net C=100, H=128, no bias: 100·128 + 128·128 + 128·100 (SPEC §1)
T4 = "cifar100_lt_r32_ir100_t4_"  # the Table 4 ablation presets

# Presets: the classes of the dataset each targets, the parameters of its classifier, and those of the
# auxiliary nets its meta mode owns, by checkpoint name.
PRESET_MODELS = {
    "cifar100_lt_r32_ir100": (100, R32_C100, {"diffnet": D_C100}),
    "cifar100_lt_r32_ir100_bs": (100, R32_C100, {"diffnet": D_C100}),
    f"{T4}1_focal": (100, R32_C100, {}),
    f"{T4}2_cdb_ce": (100, R32_C100, {}),
    f"{T4}3_mwn": (100, R32_C100, {"mwn": 301}),  # V 1→100→1 with biases: 100 + 100 + 100 + 1
    f"{T4}4_cdb_ce_mwn": (100, R32_C100, {"diffnet": 16_897}),  # D^abs 1→128→128→1: 256 + 16,512 + 129
    f"{T4}5_no_dr_no_ml": (100, R32_C100, {"diffnet": D_C100}),
    f"{T4}6_no_dr": (100, R32_C100, {"diffnet": D_C100}),
    f"{T4}7_absolute": (100, R32_C100, {"diffnet": 16_897}),
    f"{T4}8_sample": (100, R32_C100, {"sample_diffnet": 49_152}),  # D^sample B=128, H=128, no bias: 3·128²
    f"{T4}9_ours": (100, R32_C100, {"diffnet": D_C100}),
    "cifar10_lt_r32_ir100": (10, 464_154, {"diffnet": 18_944}),  # 10·128 + 128² + 128·10
    "demo": (10, 269_722, {"diffnet": 18_944}),  # CIFAR ResNet-20
    "imagenet_lt_r10": (1000, 5_417_792, {"diffnet": 3_099_624}),  # 4,905,792 backbone + 512·1000 cosine head
    # torchvision resnet50: 25,557,032 with a biased fc; the cosine head has no bias (−1000).
    "imagenet_lt_r50": (1000, 25_556_032, {"diffnet": 3_099_624}),
    "imagenet_lt_r50_bs": (1000, 25_556_032, {"diffnet": 3_099_624}),
    # torchvision ResNet-152 without fc (58,143,808; the extra block has the shape of the one it replaces)
    # + the 2048·365 cosine head
    "places_lt_r152": (365, 58_891_328, {"diffnet": 637_293}),
}


def test_every_preset_is_covered():
    # Stage-2 presets (*_stage2: a stage2 section only) are checked in tests/test_stage2.py.
    assert sorted(PRESET_MODELS) == [name for name in preset_names() if not name.endswith("_stage2")]


@pytest.mark.parametrize("name", sorted(PRESET_MODELS))
def test_preset_loads_validates_and_builds(name):
    cfg = check_names(load_config(name))
    num_classes, golden, golden_aux = PRESET_MODELS[name]
    criterion = build_loss(cfg.loss, np.arange(num_classes, 0, -1, dtype=np.float64), cfg.optim.epochs)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, pretrained=""), num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        meta = build_meta_mode(cfg, model, criterion.to("meta"), optimizer, num_classes)
    assert sum(p.numel() for p in model.parameters()) == golden
    aux = {k: sum(p.numel() for p in m.parameters()) for k, m in meta.owned().modules.items()}
    assert {k: n for k, n in aux.items() if k not in ("model", "criterion")} == golden_aux
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, num_classes)


# Table 4 (SPEC §11): row -> (meta.mode, λ, loss, Difficulty-Net biases). Every row is the Ours preset with
# these keys changed, and nothing else but the run directory.
TABLE4 = {
    "1_focal": ("off", None, "focal", False),
    "2_cdb_ce": ("off", None, "cdb_ce", False),
    "3_mwn": ("mwn", None, "ce", False),
    "4_cdb_ce_mwn": ("exact_absolute", 0.0, "ce", True),
    "5_no_dr_no_ml": ("frozen", None, "ce", False),
    "6_no_dr": ("exact", 0.0, "ce", False),
    "7_absolute": ("exact_absolute", 0.3, "ce", True),
    "8_sample": ("exact_sample", 0.3, "ce", False),
    "9_ours": ("exact", 0.3, "ce", False),
}


@pytest.mark.parametrize("row", sorted(TABLE4))
def test_table4_presets_differ_from_ours_only_in_their_row(row):
    mode, lam, loss, bias = TABLE4[row]
    cfg, ours = load_config(T4 + row), load_config("cifar100_lt_r32_ir100")
    assert (cfg.meta.mode, cfg.loss.name, cfg.diffnet.bias) == (mode, loss, bias)
    if lam is not None:
        assert cfg.meta.lambda_dr == lam
    assert cfg.run.name == f"{T4}{row}"  # its default run directory: runs/<preset>/<time>-<mode>-s<seed>
    mine, base = config_to_dict(cfg), config_to_dict(ours)
    for section in ("data", "model", "optim"):
        assert mine[section] == base[section], section  # the same classifier recipe (SPEC §6.1)
    assert {k for k, v in mine["run"].items() if base["run"][k] != v} == {"name"}


def test_mwn_preset_has_the_class_imbalance_optimiser_for_v():
    m = load_config(f"{T4}3_mwn").meta
    got = (m.mwn_hidden, m.mwn_lr, m.mwn_momentum, m.mwn_nesterov, m.mwn_weight_decay)
    assert got == (100, 1e-5, 0.9, True, 5e-4)


def _ldam_drw_lr(epoch: int, lr: float = 0.1) -> float:
    """kaidic/LDAM-DRW cifar_train.py ``adjust_learning_rate(optimizer, epoch, args)``, epoch 0-based."""
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.0001
    if epoch > 160:
        return lr * 0.01
    return lr


@pytest.mark.parametrize(
    "name", ["cifar100_lt_r32_ir100", "cifar100_lt_r32_ir100_bs", "cifar10_lt_r32_ir100", f"{T4}9_ours"]
)
def test_cifar_presets_follow_the_ldam_drw_schedule(name):
    o = load_config(name).optim
    recipe = (o.epochs, o.lr, o.momentum, o.nesterov, o.weight_decay, o.batch_size)
    assert recipe == (200, 0.1, 0.9, False, 2e-4, 128)  # SPEC §6.1 standard
    got = [o.lr * lr_factor(e, o) for e in range(o.epochs)]
    expected = [_ldam_drw_lr(e) for e in range(o.epochs)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert got[159] == pytest.approx(0.1)  # the last full-lr epoch (0-based 159)
    assert got[160] == pytest.approx(1e-3)


def test_base_presets_merge_key_by_key_and_reject_cycles(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: demo\noptim: {lr: 0.05}\nmeta: {mode: frozen}\n")
    raw = read_preset(str(child))
    assert "base" not in raw
    cfg = load_config(str(child))
    demo = load_config("demo")
    assert (cfg.optim.lr, cfg.meta.mode) == (0.05, "frozen")
    assert cfg.optim.epochs == demo.optim.epochs  # the rest of the section comes from the base
    assert cfg.meta.meta_batch == demo.meta.meta_batch
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(a))
    a.write_text("base: [demo]\n")
    with pytest.raises(ValueError, match="base must be a preset name"):
        load_config(str(a))


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
        ("meta.mwn_momentum=1", "meta.mwn_momentum"),
        ("meta.mwn_weight_decay=-1e-4", "meta.mwn_weight_decay"),
        ("meta.mwn_nesterov=true", "meta.mwn_nesterov"),  # with mwn_momentum 0 below
        ("diffnet.temperature=0", "diffnet.temperature"),
        ("diffnet.temperature=-0.5", "diffnet.temperature"),
        ("diffnet.temperature=0.5", "sum_to_C only"),  # with normalize none below
    ],
)
def test_bad_values_are_rejected(override, message):
    extra = {
        "optim.nesterov": ["optim.momentum=0"],
        "meta.mwn_nesterov": ["meta.mwn_momentum=0"],
        "diffnet.temperature=0.5": ["diffnet.normalize=none"],
    }
    extra = extra.get(override, extra.get(override.split("=")[0], []))
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
