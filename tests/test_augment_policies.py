"""Policy tables and magnitude → argument functions against the published sources; Recipe and spec validation.

The expected values are written here from the sources, not read from the implementation: the AutoAugment paper's
reduced-CIFAR-10 policy (as DeepVoltaire/AutoAugment ``CIFAR10Policy`` lists it, with its ``SubPolicy`` ranges)
and timm's ``timm/data/auto_augment.py`` (``_RAND_TRANSFORMS``, ``LEVEL_TO_ARG``, ``rand_augment_transform``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dnet_fast.data.base import LoaderSpec
from dnet_fast.data.policies import (
    CIFAR10_POLICY,
    RAND_FILL,
    RAND_TRANSFORMS,
    RandAugmentSpec,
    Recipe,
    autoaugment_arg,
    parse_randaugment,
    randaugment_arg,
)

# DeepVoltaire CIFAR10Policy: SubPolicy(p1, op1, m1, p2, op2, m2), in order.
PUBLISHED_CIFAR10 = [
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
]


def test_cifar10_policy_matches_the_published_table():
    assert len(CIFAR10_POLICY) == 25
    for (first, second), (p1, n1, m1, p2, n2, m2) in zip(CIFAR10_POLICY, PUBLISHED_CIFAR10, strict=True):
        assert (first.name.lower(), first.prob, first.bin) == (n1.lower(), p1, m1)
        assert (second.name.lower(), second.prob, second.bin) == (n2.lower(), p2, m2)


# SubPolicy ranges: bin m → value m/9 of the way through the range (np.linspace(lo, hi, 10)).
def _bin(lo, hi, m):
    return lo + (hi - lo) * m / 9


@pytest.mark.parametrize("m", range(10))
def test_autoaugment_bins_map_onto_the_paper_ranges(m):
    bins, pos, neg = torch.tensor([m]), torch.tensor([False]), torch.tensor([True])

    def arg(name, negate=pos, h=32, w=40):
        return float(autoaugment_arg(name, bins, negate, h, w)[0])

    for name in ("ShearX", "ShearY"):
        assert arg(name) == pytest.approx(_bin(0, 0.3, m), abs=1e-12)
        assert arg(name, neg) == pytest.approx(-_bin(0, 0.3, m), abs=1e-12)
    assert arg("TranslateX") == pytest.approx(_bin(0, 150 / 331, m) * 40, abs=1e-9)  # × width
    assert arg("TranslateY", neg) == pytest.approx(-_bin(0, 150 / 331, m) * 32, abs=1e-9)  # × height
    assert arg("Rotate", neg) == pytest.approx(-_bin(0, 30, m), abs=1e-9)
    for name in ("Color", "Contrast", "Sharpness", "Brightness"):
        assert arg(name) == pytest.approx(1 + _bin(0, 0.9, m), abs=1e-12)
        assert arg(name, neg) == pytest.approx(1 - _bin(0, 0.9, m), abs=1e-12)
    assert arg("Posterize") == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4][m]
    assert arg("Solarize", neg) == pytest.approx(_bin(256, 0, m), abs=1e-9)  # never negated
    assert arg("Invert") == 0.0


# timm's RandAugment op list (timm/data/auto_augment.py ``_RAND_TRANSFORMS``), in its order: the op index drawn
# per layer indexes it. tests/test_augment.py's PIL reference reads it from here.
TIMM_RAND = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def test_randaugment_op_list_is_timms():
    assert RAND_TRANSFORMS == TIMM_RAND
    assert RAND_FILL == (124, 116, 104)  # timm img_mean: min(255, round(255 · ImageNet mean))


# timm LEVEL_TO_ARG (level already clipped to [0, 10]), in Python doubles; negate = _randomly_negate's choice.
def _timm(name, level, negate, h, w):
    s = -1 if negate else 1
    table = {
        "Rotate": lambda: (level / 10.0) * 30.0 * s,
        "Posterize": lambda: int((level / 10.0) * 4),
        "Solarize": lambda: min(256, int((level / 10.0) * 256)),
        "SolarizeAdd": lambda: min(128, int((level / 10.0) * 110)),
        "ShearX": lambda: (level / 10.0) * 0.3 * s,
        "ShearY": lambda: (level / 10.0) * 0.3 * s,
        "TranslateXRel": lambda: (level / 10.0) * 0.45 * s * w,  # translate_x_rel: pixels = pct · width
        "TranslateYRel": lambda: (level / 10.0) * 0.45 * s * h,
    }
    for enhance in ("Color", "Contrast", "Brightness", "Sharpness"):
        table[enhance] = lambda: (level / 10.0) * 1.8 + 0.1
    return table[name]() if name in table else 0.0


def test_randaugment_level_to_arg_equals_timm_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    levels = (10 + 0.5 * torch.randn(400, generator=gen, dtype=torch.float64)).clamp(0, 10)
    levels[:5] = torch.tensor([0.0, 2.5, 5.0, 9.99, 10.0], dtype=torch.float64)
    negate = torch.rand(400, generator=gen) < 0.5
    for name in RAND_TRANSFORMS:
        got = randaugment_arg(name, levels, negate, 224, 200).tolist()
        want = [
            _timm(name, lv, ng, 224, 200) for lv, ng in zip(levels.tolist(), negate.tolist(), strict=True)
        ]
        assert got == want, name  # exact: the same double operations in the same order


def test_parse_randaugment():
    assert parse_randaugment("rand-n2-m10-mstd0.5") == RandAugmentSpec(
        n=2, m=10.0, mstd=0.5, p=0.5, mmax=10.0
    )
    assert parse_randaugment("rand-m9-mstd1-p0.3") == RandAugmentSpec(n=2, m=9.0, mstd=1.0, p=0.3)
    assert parse_randaugment("rand") == RandAugmentSpec()


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("rand-n2-m10-inc1", "'inc1'"),
        ("rand-n2-x3", "'x3'"),
        ("augmix-m5", "'augmix'"),
        ("rand-n2.5", "'n2.5'"),
        ("rand-tweights", "'tweights'"),
        ("rand-mstd200", "mstd"),
        ("rand-n0", "n >= 1"),
    ],
)
def test_parse_randaugment_names_the_bad_part(spec, bad):
    with pytest.raises(ValueError, match=bad):
        parse_randaugment(spec)


def test_recipe_defaults_validation_and_presets():
    assert not Recipe().active
    assert Recipe(cutout=16).active
    cifar = Recipe(autoaugment="cifar10", cutout=16)
    imagenet = Recipe(color_jitter=0.4, randaugment="rand-n2-m10-mstd0.5")
    assert cifar.active
    assert imagenet.rand == RandAugmentSpec(mstd=0.5)
    with pytest.raises(ValueError, match="autoaugment"):
        Recipe(autoaugment="imagenet")
    with pytest.raises(ValueError, match="'w0'"):
        Recipe(randaugment="rand-w0")
    with pytest.raises(ValueError, match="color_jitter"):
        Recipe(color_jitter=-0.1)
    with pytest.raises(ValueError, match="cutout"):
        Recipe(cutout=2.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cifar.cutout = 8  # type: ignore[misc]


def test_loader_spec_carries_the_recipe():
    spec = LoaderSpec(batch_size=4, augment="cifar")
    assert spec.recipe == Recipe()
    assert spec.train_recipe is None  # inactive recipe: nothing added
    on = dataclasses.replace(spec, recipe=Recipe(cutout=8))
    assert on.train_recipe == Recipe(cutout=8)
    assert dataclasses.replace(on, train=False).train_recipe is None
    assert dataclasses.replace(on, augment="none").train_recipe is None
    with pytest.raises(TypeError, match="Recipe"):
        LoaderSpec(batch_size=4, recipe={"cutout": 8})  # type: ignore[arg-type]
