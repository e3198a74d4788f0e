"""Batched tensor transforms and their PIL twins: pixel-level checks, determinism, box statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dnet_fast.data.transforms import (
    CIFAR_PAD,
    batch_generator,
    cifar_crop_flip,
    draw_params,
    eval_size,
    eval_transform,
    normalize,
    pil_decode_resident,
    pil_eval,
    pil_to_tensor,
    pil_train,
    random_resized_crop,
    rrc_boxes,
    train_transform,
)


def _images(n=4, h=6, w=5, seed=0):
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.integers(1, 256, (n, h, w, 3), dtype=np.uint8))  # 1..255: zero marks padding


def _params(top, left, flip):
    return {"top": torch.tensor(top), "left": torch.tensor(left), "flip": torch.tensor(flip)}


def test_cifar_crop_offsets_against_hand_slices():
    x = _images()
    out = cifar_crop_flip(x, _params([4, 0, 8, 2], [4, 0, 8, 7], [False, False, False, False]))
    assert torch.equal(out[0], x[0])  # centre crop of the padded image is the image
    assert torch.equal(out[1, 4:, 4:], x[1, :2, :1])  # top-left crop: 4 rows/cols of padding first
    assert (out[1, :4] == 0).all()
    assert (out[1, :, :4] == 0).all()
    assert torch.equal(out[2, :2, :1], x[2, 4:, 4:])  # bottom-right crop
    assert (out[2, 2:] == 0).all()
    assert torch.equal(out[3, 2:, :2], x[3, :4, 3:])  # top=2 → rows 0..3 of the image at rows 2..5


def test_flip_of_a_known_image():
    x = torch.arange(2 * 3 * 4 * 3, dtype=torch.uint8).reshape(2, 3, 4, 3)
    out = cifar_crop_flip(x, _params([4, 4], [4, 4], [True, False]))
    assert torch.equal(out[0], x[0].flip(1))
    assert torch.equal(out[1], x[1])
    assert out[0, 1, 0].tolist() == x[0, 1, 3].tolist()


def test_cifar_pil_path_is_bit_identical():
    x = _images(n=16, h=9, w=7, seed=3)
    params = draw_params("cifar", batch_generator(5, 2, 1), 16)
    batched = cifar_crop_flip(x, params)
    for i in range(16):
        img = Image.fromarray(x[i].numpy())
        assert torch.equal(pil_train(img, "cifar", params, i, 224), batched[i])


def test_normalize_and_layout():
    x = torch.full((2, 3, 4, 3), 255, dtype=torch.uint8)
    x[..., 1] = 0
    y = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert y.shape == (2, 3, 3, 4)
    assert y.dtype == torch.float32
    assert torch.allclose(y[:, 0], torch.tensor(2.0))
    assert torch.allclose(y[:, 1], torch.tensor(-1.0))
    assert torch.allclose(y[:, 2], torch.tensor(0.5))


def test_generators_are_pure_functions_of_seed_epoch_batch():
    a = draw_params("imagenet", batch_generator(1, 2, 3), 8)
    b = draw_params("imagenet", batch_generator(1, 2, 3), 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for other in (batch_generator(1, 2, 4), batch_generator(1, 3, 3), batch_generator(2, 2, 3)):
        assert not torch.equal(a["area"], draw_params("imagenet", other, 8)["area"])
    with pytest.raises(ValueError, match="unknown augmentation"):
        draw_params("autoaugment", batch_generator(0, 0, 0), 1)


def test_rrc_boxes_inside_image_with_valid_area_and_ratio():
    n = 4000
    params = draw_params("imagenet", batch_generator(0, 0, 0), n)
    h = torch.randint(20, 300, (n,), generator=torch.Generator().manual_seed(0))
    w = torch.randint(20, 300, (n,), generator=torch.Generator().manual_seed(1))
    top, left, bh, bw = rrc_boxes(params, h, w).unbind(1)
    assert (top >= 0).all()
    assert (left >= 0).all()
    assert (top + bh <= h).all()
    assert (left + bw <= w).all()
    assert (bh > 0).all()
    assert (bw > 0).all()
    frac = (bh * bw).double() / (h * w).double()
    assert frac.min() > 0.05
    assert frac.max() <= 1.0


def _torchvision_box(u: dict, height: int, width: int) -> list[int]:
    """torchvision's RandomResizedCrop.get_params written out per image, fed the same uniforms."""
    area = height * width
    for k in range(10):
        target = area * (0.08 + 0.92 * float(u["area"][k]))
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(u["logr"][k]))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [int(float(u["ti"]) * (height - h + 1)), int(float(u["tj"]) * (width - w + 1)), h, w]
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * 4 / 3))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def test_rrc_boxes_match_the_scalar_algorithm():
    n = 500
    params = draw_params("imagenet", batch_generator(9, 0, 0), n)
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randint(3, 200, (n,), generator=gen), torch.randint(3, 200, (n,), generator=gen)
    h[:50], w[:50] = 4, 190  # extreme aspect ratios exercise the fallback
    boxes = rrc_boxes(params, h, w).tolist()
    for i in range(n):
        u = {k: v[i] for k, v in params.items()}
        assert boxes[i] == _torchvision_box(u, int(h[i]), int(w[i])), i


def test_rrc_fallback_is_centre_crop_with_clamped_ratio():
    params = {
        "area": torch.ones(1, 10),
        "logr": torch.ones(1, 10),
        "ti": torch.zeros(1),
        "tj": torch.zeros(1),
    }
    # Very wide image: every attempt is too tall → fallback centre crop of ratio 4/3.
    box = rrc_boxes(params, torch.tensor([10]), torch.tensor([100]))[0].tolist()
    assert box == [0, 43, 10, 13]


def test_rrc_identity_box_and_flip():
    x = _images(n=2, h=8, w=8, seed=1)
    params = {
        "area": torch.full((2, 10), 1.0),  # area fraction 1 …
        "logr": torch.full((2, 10), 0.5),  # … at aspect 1 → the whole image
        "ti": torch.zeros(2),
        "tj": torch.zeros(2),
        "flip": torch.tensor([False, True]),
    }
    out = random_resized_crop(x, params, 8)
    assert torch.allclose(out[0], x[0].float(), atol=1e-3)
    assert torch.allclose(out[1], x[1].flip(1).float(), atol=1e-3)


def test_rrc_crop_of_a_sub_box_matches_slice():
    x = _images(n=1, h=16, w=16, seed=2)
    # Box 8×8 at (top 2, left 5) resampled to 8×8 is exactly that slice.
    area = torch.full((1, 10), (64 / 256 - 0.08) / 0.92, dtype=torch.float64)
    params = {"area": area, "logr": torch.full((1, 10), 0.5, dtype=torch.float64)}
    params |= {
        "ti": torch.tensor([2 / 9 + 1e-9]),
        "tj": torch.tensor([5 / 9 + 1e-9]),
        "flip": torch.tensor([False]),
    }
    assert rrc_boxes(params, torch.tensor([16]), torch.tensor([16]))[0].tolist() == [2, 5, 8, 8]
    out = random_resized_crop(x, params, 8)
    assert torch.allclose(out[0], x[0, 2:10, 5:13].float(), atol=1e-3)


def test_imagenet_eval_tensor_equals_pil_on_resident_images():
    rng = np.random.Generator(np.random.PCG64(0))
    crop = 16
    for h, w in ((30, 41), (57, 20), (18, 18)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        stored = pil_to_tensor(pil_decode_resident(img, crop))  # what the resident loader holds
        r = eval_size(crop)
        assert stored.shape == (r, r, 3)
        via_tensor = eval_transform(stored[None], "imagenet", crop, (0.5,) * 3, (0.2,) * 3)
        via_pil = normalize(pil_eval(img, "imagenet", crop)[None], (0.5,) * 3, (0.2,) * 3)
        assert via_tensor.shape == (1, 3, crop, crop)
        assert torch.equal(via_tensor, via_pil)


def test_eval_size_and_cifar_eval_is_normalise_only():
    assert eval_size(224) == 256
    assert eval_size(112) == 128
    x = _images()
    assert torch.equal(
        eval_transform(x, "cifar", 224, (0.1,) * 3, (0.3,) * 3), normalize(x, (0.1,) * 3, (0.3,) * 3)
    )


def test_train_transform_shapes_static():
    x = _images(n=3, h=20, w=20)
    for family, size in (("cifar", 20), ("imagenet", 12)):
        params = draw_params(family, batch_generator(0, 0, 0), 3)
        y = train_transform(x, family, params, 12, (0.5,) * 3, (0.5,) * 3)
        assert y.shape == (3, 3, size, size)
        assert y.dtype == torch.float32


def test_pil_imagenet_train_uses_the_same_box():
    rng = np.random.Generator(np.random.PCG64(4))
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    params = draw_params("imagenet", batch_generator(0, 1, 0), 4)
    batched = random_resized_crop(
        pil_to_tensor(img)[None].expand(4, -1, -1, -1), params, 12
    )  # (4, 12, 12, 3)
    for row in range(4):
        one = pil_train(img, "imagenet", params, row, 12).float()
        assert one.shape == (12, 12, 3)
        # Different resampling filters, same geometry: close on average.
        assert (one - batched[row]).abs().mean() < 40
    assert CIFAR_PAD == 4
