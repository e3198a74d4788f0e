"""Tests of dnet_fast.models: registry contract, golden parameter counts, torchvision names, pretrained loading."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from dnet_fast.config import ModelConfig
from dnet_fast.models import (
    MODELS,
    CosineClassifier,
    DifficultyNet,
    MetaWeightNet,
    build_head,
    build_model,
    load_pretrained,
    param_groups,
)
from dnet_fast.models.cifar_resnet import PadShortcut
from dnet_fast.registry import UnknownNameError

GOLDEN = Path(__file__).parent / "golden" / "model_params.json"
CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56")
IMAGENET = {  # name -> (basic block?, blocks per stage)
    "resnet10": (True, [1, 1, 1, 1]),
    "resnet18": (True, [2, 2, 2, 2]),
    "resnet34": (True, [3, 4, 6, 3]),
    "resnet50": (False, [3, 4, 6, 3]),
    "resnet101": (False, [3, 4, 23, 3]),
    "resnet152": (False, [3, 8, 36, 3]),
}
# Published torchvision counts (1000 classes, linear head), independent of any formula here.
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


# ---------------------------------------------------------------------------------------------------------
# Layer-by-layer parameter formulas (independent of the model code).


def _bn(c: int) -> int:
    return 2 * c


def _head(features: int, classes: int, head: str) -> int:
    return features * classes + (classes if head == "linear" else 0)


def _cifar_count(depth: int, classes: int, head: str, width: int = 16) -> int:
    total = 3 * width * 9 + _bn(width)
    c_in = width
    for c in (width, 2 * width, 4 * width):
        for _ in range(depth):  # option-A shortcuts have no parameters
            total += 9 * c_in * c + _bn(c) + 9 * c * c + _bn(c)
            c_in = c
    return total + _head(4 * width, classes, head)


def _imagenet_block(basic: bool, c_in: int, planes: int, stride: int) -> int:
    c_out = planes if basic else 4 * planes
    if basic:
        total = 9 * c_in * planes + _bn(planes) + 9 * planes * planes + _bn(planes)
    else:
        total = c_in * planes + _bn(planes) + 9 * planes * planes + _bn(planes) + planes * c_out + _bn(c_out)
    if stride != 1 or c_in != c_out:  # projection shortcut: 1×1 conv + BN
        total += c_in * c_out + _bn(c_out)
    return total


def _imagenet_count(basic: bool, layers: list[int], classes: int, head: str) -> int:
    total = 3 * 64 * 49 + _bn(64)
    c_in = 64
    for planes, depth in zip((64, 128, 256, 512), layers, strict=True):
        for j in range(depth):
            total += _imagenet_block(basic, c_in, planes, 2 if j == 0 and planes != 64 else 1)
            c_in = planes if basic else 4 * planes
    return total + _head(c_in, classes, head)


GOLDEN_CASES = {  # golden key -> (registry name, classes, head)
    **{f"{n}/100/linear": (n, 100, "linear") for n in CIFAR},
    "resnet32/10/linear": ("resnet32", 10, "linear"),
    "resnet32/100/cosine": ("resnet32", 100, "cosine"),
    **{f"{n}/1000/linear": (n, 1000, "linear") for n in IMAGENET},
    "resnet10/1000/cosine": ("resnet10", 1000, "cosine"),
    "resnet50/1000/cosine": ("resnet50", 1000, "cosine"),
    "places_resnet152/365/cosine": ("places_resnet152", 365, "cosine"),
}


def _formula(name: str, classes: int, head: str) -> int:
    if name in CIFAR:
        return _cifar_count((int(name[6:]) - 2) // 6, classes, head)
    if name == "places_resnet152":  # same shapes as ResNet-152: the extra block replaces layer4.2 one for one
        return _imagenet_count(False, IMAGENET["resnet152"][1], classes, head)
    return _imagenet_count(*IMAGENET[name], classes, head)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_build(name: str, classes: int, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return MODELS.get(name)(classes, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Registry and golden counts.


def test_registry_holds_the_contract_names() -> None:
    assert set(MODELS.names()) == {*CIFAR, *IMAGENET, "places_resnet152"}
    with pytest.raises(UnknownNameError, match="resnet32"):
        MODELS.get("resnet33")


def test_golden_file_matches_formulas() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(GOLDEN_CASES)
    for key, case in GOLDEN_CASES.items():
        assert golden[key] == _formula(*case), key
    assert golden["resnet32/100/linear"] == 470_004  # "≈ 0.47 M" (SPEC §6.1)
    for name, count in TORCHVISION_COUNTS.items():
        assert golden[f"{name}/1000/linear"] == count


@pytest.mark.parametrize("key", sorted(GOLDEN_CASES))
def test_every_model_builds_on_meta_with_golden_count(key: str) -> None:
    name, classes, head = GOLDEN_CASES[key]
    model = _meta_build(name, classes, head=head, head_scale=30.0, width=16, unused=1)
    assert _count(model) == json.loads(GOLDEN.read_text())[key]
    assert isinstance(model.fc, CosineClassifier if head == "cosine" else nn.Linear)


def test_cifar_width_scales_channels() -> None:
    model = _meta_build("resnet20", 10, width=32)
    assert model.num_features == 128
    assert _count(model) == _cifar_count(3, 10, "linear", width=32)


# ---------------------------------------------------------------------------------------------------------
# Forward passes of the cheap models on CPU.


@pytest.mark.parametrize(("name", "head"), [(n, "linear") for n in CIFAR] + [("resnet20", "cosine")])
def test_cifar_forward_shape_finite_and_backward(name: str, head: str) -> None:
    torch.manual_seed(0)
    model = MODELS.get(name)(7, head=head)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)  # (2, 7)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_resnet10_forward_at_32px(head: str) -> None:
    torch.manual_seed(0)
    model = MODELS.get("resnet10")(5, head=head)
    features = model.forward_features(torch.randn(2, 3, 32, 32))  # (2, 512)
    assert features.shape == (2, 512)
    logits = model.fc(features)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    if head == "cosine":
        assert logits.abs().max() <= 30.0 + 1e-4


def test_pad_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)  # (2, 32, 4, 4)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any()
    assert not y[:, 24:].any()


def test_channels_last_and_init() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet20", channels_last=True), 10)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.pretrained_names == frozenset()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_imagenet_init_has_no_zero_init_residual() -> None:
    torch.manual_seed(0)
    model = MODELS.get("resnet10")(10)
    assert torch.equal(model.layer1[0].bn2.weight, torch.ones(64))
    # Kaiming-normal fan_out: std = sqrt(2 / (64 * 3 * 3)) for the 3×3 convs of layer1.
    assert model.layer1[0].conv1.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)


# ---------------------------------------------------------------------------------------------------------
# torchvision key names.


def _bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _torchvision_keys(basic: bool, layers: list[int]) -> list[str]:
    keys = ["conv1.weight", *_bn_keys("bn1")]
    for i, depth in enumerate(layers):
        for j in range(depth):
            block = f"layer{i + 1}.{j}"
            for k in range(1, 3 if basic else 4):
                keys += [f"{block}.conv{k}.weight", *_bn_keys(f"{block}.bn{k}")]
            if j == 0 and not (basic and i == 0):
                keys += [f"{block}.downsample.0.weight", *_bn_keys(f"{block}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_keys_equal_torchvision(name: str) -> None:
    model = _meta_build(name, 1000)
    assert list(model.state_dict()) == _torchvision_keys(*IMAGENET[name])


# ---------------------------------------------------------------------------------------------------------
# Pretrained loading.


@pytest.fixture(scope="module")
def torchvision_r152(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-152 checkpoint as torchvision writes it (1000-way linear fc), random values."""
    gen = torch.Generator().manual_seed(1)
    shapes = _meta_build("resnet152", 1000).state_dict()
    state = {k: torch.randn(v.shape, generator=gen) for k, v in shapes.items() if not k.endswith("tracked")}
    state |= {k: v.abs() + 0.5 for k, v in state.items() if k.endswith("running_var")}  # valid variances
    path = tmp_path_factory.mktemp("ckpt") / "resnet152-b121ed2d.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def places_model(torchvision_r152: tuple[Path, dict[str, torch.Tensor]]) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="places_resnet152", head="cosine", pretrained=str(torchvision_r152[0]))
    return build_model(cfg, 365)


def test_places_loads_all_but_extra_block_and_fc(
    places_model: nn.Module, torchvision_r152: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    _, state = torchvision_r152
    ours = places_model.state_dict()
    for key, value in state.items():
        if key.startswith(("layer4.2.", "fc.")):
            continue
        assert torch.equal(ours[key], value), key
    assert not torch.equal(ours["layer4.2.conv1.weight"], state["layer4.2.conv1.weight"])
    assert "fc.bias" not in ours
    assert ours["fc.weight"].shape == (365, 2048)
    names = places_model.pretrained_names
    assert names == {n for n, _ in places_model.named_parameters() if not n.startswith(("layer4.2.", "fc."))}


def test_places_extra_block_has_default_init(places_model: nn.Module) -> None:
    block = places_model.extra_block
    assert block is places_model.layer4[2]
    assert block.conv1.weight.shape == (512, 2048, 1, 1)
    assert block.conv3.weight.shape == (2048, 512, 1, 1)
    assert block.downsample is None
    # PyTorch's default conv init is U(±1/sqrt(fan_in)); Kaiming fan_out would be ~3× wider.
    assert block.conv1.weight.abs().max() <= 1 / math.sqrt(2048)
    assert places_model.layer4[2].bn1.running_var.eq(1).all()


def test_places_forward_shape(places_model: nn.Module) -> None:
    # Train-mode BN on a copy: the random "pretrained" statistics would overflow in eval mode, and the shared
    # fixture must keep its loaded buffers.
    model = copy.deepcopy(places_model).train()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))  # (2, 365); 64 px keeps the CPU cost low
    assert logits.shape == (2, 365)
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= 30.0 + 1e-4


def test_places_param_groups(places_model: nn.Module) -> None:
    groups = param_groups(places_model, lr=0.01, pretrained_lr_mult=0.1, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["pretrained", "new"]
    assert groups[0]["lr"] == pytest.approx(0.001)
    assert groups[1]["lr"] == pytest.approx(0.01)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(places_model.parameters()))
    new = {id(p) for p in groups[1]["params"]}
    expected_new = {id(p) for n, p in places_model.named_parameters() if n.startswith(("layer4.2.", "fc."))}
    assert new == expected_new
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # the groups are valid optimizer input


def test_param_groups_without_pretrained_has_one_group() -> None:
    model = MODELS.get("resnet20")(10)
    groups = param_groups(model, lr=0.1, pretrained_lr_mult=0.1, weight_decay=2e-4)
    assert [g["name"] for g in groups] == ["new"]
    assert len(groups[0]["params"]) == len(list(model.parameters()))


@pytest.fixture
def r10_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = MODELS.get("resnet10")(1000).state_dict()
    return tmp_path / "r10.pth", state


def test_resnet10_round_trip_via_build_model(r10_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = r10_checkpoint
    torch.save(state, path)
    model = build_model(ModelConfig(backbone="resnet10", head="cosine", pretrained=str(path)), 10)
    assert torch.equal(model.layer4[0].downsample[0].weight, state["layer4.0.downsample.0.weight"])
    assert "fc.weight" not in model.pretrained_names
    assert len(model.pretrained_names) == len(list(model.parameters())) - 1


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda s: s.pop("layer2.0.conv1.weight"), "missing keys: layer2.0.conv1.weight"),
        (lambda s: s.update({"layer1.0.bn1.weight": torch.ones(3)}), "shape mismatches: layer1.0.bn1.weight"),
        (
            lambda s: s.update({"layer5.0.conv1.weight": torch.ones(3)}),
            "unexpected keys: layer5.0.conv1.weight",
        ),
        (lambda s: s.update({"extra": "not a tensor"}), "flat dict of tensors"),
    ],
)
def test_bad_checkpoint_raises_naming_the_file(
    r10_checkpoint: tuple[Path, dict[str, torch.Tensor]],
    corrupt: Callable[[dict[str, object]], object],
    match: str,
) -> None:
    path, state = r10_checkpoint
    corrupt(state)
    torch.save(state, path)
    model = MODELS.get("resnet10")(10)
    with pytest.raises(ValueError, match=match) as info:
        load_pretrained(model, path)
    assert str(path) in str(info.value)


def test_missing_batch_counters_are_accepted(r10_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = r10_checkpoint  # torchvision's original ResNet files predate num_batches_tracked
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    load_pretrained(MODELS.get("resnet10")(10), path)


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", None])
def test_unreadable_checkpoint_raises_naming_the_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.pth"
    if content is not None:
        path.write_bytes(content)
    cfg = ModelConfig(backbone="resnet20", pretrained=str(path))
    with pytest.raises(ValueError, match="cannot be read") as info:
        build_model(cfg, 10)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Heads.


def test_cosine_head_hand_computed() -> None:
    head = CosineClassifier(2, 2, scale=30.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    logits = head(torch.tensor([[2.0, 2.0]]))  # (1, 2)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[30.0 * (0.6 * s + 0.8 * s), 30.0 * s]])
    torch.testing.assert_close(logits, expected)


def test_cosine_head_init_and_names() -> None:
    torch.manual_seed(0)
    head = build_head("cosine", 64, 10, scale=16.0)
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    assert head.weight.shape == (10, 64)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))
    assert head.scale == 16.0
    with pytest.raises(ValueError, match="valid: cosine, linear"):
        build_head("arcface", 64, 10)


# ---------------------------------------------------------------------------------------------------------
# Difficulty-Net and Meta-Weight-Net.


@pytest.mark.parametrize(
    ("classes", "hidden", "bias", "count"),
    [(100, 128, False, 41_984), (1000, 1024, True, 3_099_624), (365, 512, True, 637_293)],
)
def test_difficulty_net_parameter_counts(classes: int, hidden: int, bias: bool, count: int) -> None:
    with torch.device("meta"):
        net = DifficultyNet(classes, hidden, bias)
    assert _count(net) == count


def test_difficulty_net_shape_range_and_gradient() -> None:
    torch.manual_seed(0)
    net = DifficultyNet(100, 128, bias=False)
    acc = torch.rand(100)
    d = net(acc)  # (100,)
    assert d.shape == (100,)
    assert ((d > 0) & (d < 1)).all()
    torch.testing.assert_close(net(acc.reshape(1, 100)), d)
    d.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    # Zero input to the bias-free CIFAR net gives d = 0.5 exactly (SPEC §13 #15).
    assert torch.equal(net(torch.zeros(100)), torch.full((100,), 0.5))


def test_meta_weight_net() -> None:
    torch.manual_seed(0)
    net = MetaWeightNet()
    assert _count(net) == 301
    w = net(torch.rand(8))  # (8,)
    assert w.shape == (8,)
    assert ((w > 0) & (w < 1)).all()
