"""The batched augmentation ops against PIL (ImageOps / ImageEnhance / Image.transform) and hand-computed pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from dnet_fast.data.augment_ops import OPS, blend, grey_levels
from dnet_fast.data.warp import affine_matrix, warp_affine

FILL = (124, 116, 104)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _images(n=6, h=11, w=14, seed=0, low=0, high=256):
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.integers(low, high, (n, h, w, 3), dtype=np.uint8))


def _run(name, x, args, bicubic=False, fill=FILL):
    arg = torch.tensor(args, dtype=torch.float64)
    return OPS.get(name).batched(x, arg, torch.full((len(args),), bicubic), fill)


def _pil(x):
    return Image.fromarray(x.numpy(), "RGB")


def _arr(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


# ----------------------------------------------------------------------------------------------------------
# PIL references written out here, independently of augment_ops' PIL twins


def _pil_reference(name, img, arg, bicubic, fill):
    resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    affine = {
        "ShearX": (1, arg, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, arg, 1, 0),
        "TranslateX": (1, 0, arg, 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, arg),
    }
    if name in affine:
        return img.transform(img.size, Image.Transform.AFFINE, affine[name], resample, fillcolor=fill)
    if name == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=fill)
    enhance = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color}
    enhance |= {"Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](img).enhance(arg)
    if name == "Solarize":
        return ImageOps.solarize(img, arg)
    if name == "Posterize":
        return ImageOps.posterize(img, int(arg))
    return {"Invert": ImageOps.invert, "AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize}[
        name
    ](img)


CASES = [
    ("Invert", [0.0] * 6),
    ("AutoContrast", [0.0] * 6),
    ("Equalize", [0.0] * 6),
    ("Posterize", [1, 2, 4, 6, 7, 3]),
    ("Solarize", [0, 1, 128, 227.55, 255, 256]),
    ("Brightness", [0.1, 0.6, 1.0, 1.37, 1.9, 0.0]),
    ("Color", [0.1, 0.6, 1.0, 1.37, 1.9, 0.0]),
    ("Contrast", [0.1, 0.6, 1.0, 1.37, 1.9, 0.0]),
    ("Sharpness", [0.1, 0.6, 1.0, 1.37, 1.9, 0.0]),
]


@pytest.mark.parametrize(("name", "args"), CASES)
def test_pixel_ops_equal_pil_exactly(name, args):
    x = _images(seed=len(name))
    x[1] = x[1] // 4 + 100  # a narrow histogram: autocontrast/equalize stretch it
    x[2, :, :, 0] = 77  # a flat channel: autocontrast/equalize keep it
    out = _run(name, x, args)
    for i, a in enumerate(args):
        assert torch.equal(out[i], _arr(_pil_reference(name, _pil(x[i]), a, False, FILL))), (name, a)


@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("bicubic", [False, True])
def test_geometric_ops_equal_pil_exactly(name, bicubic):
    gen = torch.Generator().manual_seed(len(name) + bicubic)
    scale = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3}.get(name, 9.0)
    args = ((torch.rand(24, generator=gen, dtype=torch.float64) * 2 - 1) * scale).tolist()
    args[:4] = [0.0, scale, -scale, round(scale)]  # identity, extremes, an integral shift
    x = _images(n=24, h=9, w=13, seed=5)
    out = _run(name, x, args, bicubic)
    for i, a in enumerate(args):
        assert torch.equal(out[i], _arr(_pil_reference(name, _pil(x[i]), a, bicubic, FILL))), (name, a)


def test_translate_by_whole_pixels_shifts_and_fills():
    x = _images(n=2, h=5, w=6)
    out = _run("TranslateX", x, [2.0, -1.0])
    # PIL's matrix maps output x to input x + c: content moves left by c, the freed columns take the fill.
    assert torch.equal(out[0, :, :4], x[0, :, 2:])
    assert (out[0, :, 4:] == torch.tensor(FILL, dtype=torch.uint8)).all()
    assert torch.equal(out[1, :, 1:], x[1, :, :5])
    assert (out[1, :, 0] == torch.tensor(FILL, dtype=torch.uint8)).all()


def test_hand_computed_lut_ops():
    x = torch.tensor([[[[0, 127, 128], [200, 255, 7]]]], dtype=torch.uint8)  # (1, 1, 2, 3)
    assert _run("Invert", x, [0.0]).flatten().tolist() == [255, 128, 127, 55, 0, 248]
    assert _run("Posterize", x, [2]).flatten().tolist() == [0, 64, 128, 192, 192, 0]
    assert _run("Solarize", x, [128]).flatten().tolist() == [0, 127, 127, 55, 0, 7]
    assert _run("SolarizeAdd", x, [100]).flatten().tolist() == [100, 227, 128, 200, 255, 107]
    assert _run("Posterize", x, [0]).flatten().tolist() == [0] * 6  # no bits kept
    assert torch.equal(_run("Posterize", x, [8]), x)


def test_solarize_add_matches_timm_point_table():
    x = _images()
    for add in (0, 37, 110):
        out = _run("SolarizeAdd", x, [float(add)] * 6)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        for i in range(6):
            assert torch.equal(out[i], _arr(_pil(x[i]).point(lut * 3)))


def test_autocontrast_and_equalize_hand_computed():
    x = torch.zeros(1, 1, 4, 3, dtype=torch.uint8)
    x[0, 0, :, 0] = torch.tensor([10, 20, 30, 40])  # stretched to 0..255 by autocontrast
    x[0, 0, :, 1] = 9  # flat: untouched
    x[0, 0, :, 2] = torch.tensor([0, 0, 0, 255])
    ac = _run("AutoContrast", x, [0.0])[0, 0]
    assert ac[:, 0].tolist() == [0, 85, 170, 255]
    assert ac[:, 1].tolist() == [9] * 4
    eq = _run("Equalize", x, [0.0])[0, 0]
    # PIL: step = (4 − count of the top level) // 255 = 0 → identity for every channel of 4 pixels.
    assert torch.equal(eq, x[0, 0])


def test_grey_levels_match_pil_convert_l():
    x = _images(n=1, h=64, w=64, seed=9)
    assert torch.equal(grey_levels(x)[0].to(torch.uint8), _arr(_pil(x[0]).convert("L")))


def test_blend_truncates_like_pil():
    # 0 + 0.5·(3 − 0) = 1.5 → 1 (truncation, not rounding); extrapolation clips.
    x = torch.tensor([3, 200, 254], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    out = blend(torch.zeros((), dtype=torch.uint8), x, torch.tensor([0.5], dtype=torch.float64))
    assert out[0, 0, :, 0].tolist() == [1, 100, 127]
    out = blend(torch.zeros((), dtype=torch.uint8), x, torch.tensor([1.9], dtype=torch.float64))
    assert out[0, 0, :, 0].tolist() == [5, 255, 255]


def test_sharpness_keeps_the_border_and_smooths_inside():
    x = torch.zeros(1, 3, 3, 3, dtype=torch.uint8)
    x[0, 1, 1] = 130  # a single bright pixel
    out = _run("Sharpness", x, [0.0])  # factor 0: the SMOOTH image itself
    assert out[0, 1, 1].tolist() == [50] * 3  # round(5·130 / 13)
    assert (out[0].sum(-1)[[0, 2]] == 0).all()  # border rows keep the input
    assert (out[0, :, [0, 2]] == 0).all()


@pytest.mark.parametrize("name", ["Equalize", "Contrast", "Rotate", "Sharpness", "AutoContrast"])
def test_batched_equals_image_by_image(name):
    x = _images(n=7, h=10, w=9, seed=11)
    args = [1.4, 0.3, 17.0, -22.5, 0.7, 1.0, 2.0]
    flags = [True, False, True, True, False, False, True]
    arg, bic = torch.tensor(args, dtype=torch.float64), torch.tensor(flags)
    together = OPS.get(name).batched(x, arg, bic, FILL)
    for i in range(7):
        alone = OPS.get(name).batched(x[i : i + 1], arg[i : i + 1], bic[i : i + 1], FILL)
        assert torch.equal(together[i], alone[0])


def test_warp_groups_mixed_kinds_in_one_batch():
    x = _images(n=4, h=8, w=8, seed=2)
    specs = [("ShearX", 0.2), ("TranslateY", 3.0), ("Rotate", 11.0), ("TranslateX", -2.5)]
    mats = torch.tensor([affine_matrix(n, a, 8, 8) for n, a in specs], dtype=torch.float64)
    out = warp_affine(x, mats, torch.tensor([True, False, True, False]), FILL)
    for i, (name, a) in enumerate(specs):
        ref = _pil_reference(name, _pil(x[i]), a, i % 2 == 0, FILL)
        assert torch.equal(out[i], _arr(ref)), name


def test_every_registered_op_has_a_pil_twin_that_agrees():
    x = _images(n=3, h=7, w=8, seed=4)
    for name in OPS.names():
        op = OPS.get(name)
        args = [1.2, 3.0, 0.4]
        out = _run(name, x, args, bicubic=True)
        for i, a in enumerate(args):
            assert torch.equal(out[i], _arr(op.pil(_pil(x[i]), a, True, FILL))), name
