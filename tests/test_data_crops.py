"""Crop geometry against torchvision's TenCrop and ADM's center/random crop arithmetic."""

import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from vqtok.data.crops import (
    TEN_CROP_VIEWS,
    center_crop_arr,
    crop_geometry,
    crop_views,
    random_crop_arr,
    ten_crop,
)


def _known_image(w: int, h: int) -> Image.Image:
    # Smooth ramps plus a marker in one corner: every crop and flip is distinguishable.
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + 2 * y) % 256)], -1).astype(np.uint8)
    arr[:5, :9] = [255, 0, 0]
    return Image.fromarray(arr)


@pytest.mark.parametrize("size,crop_range", [(256, 1.1), (64, 1.1), (32, 1.05)])
def test_ten_crop_matches_torchvision_tencrop_order(size, crop_range):
    img = _known_image(500, 377)
    views = crop_views(img, size, ten=True, crop_range=crop_range)
    assert views.shape == (10, 3, size, size) and views.dtype == torch.uint8
    # LlamaGen/RAR: ADM center crop to int(size*crop_range), then torchvision TenCrop(size).
    square = Image.fromarray(center_crop_arr(img, int(size * crop_range)))
    expected = [torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in T.TenCrop(size)(square)]
    for i, name in enumerate(TEN_CROP_VIEWS):
        assert torch.equal(views[i], expected[i]), name


def test_ten_crop_geometry_facts():
    img = torch.arange(3 * 281 * 281, dtype=torch.int64).reshape(3, 281, 281)
    views = ten_crop(img, 256)
    # 281 -> 256: torchvision's center offset is round(12.5) = 12, not 13.
    assert torch.equal(views[4], img[:, 12:268, 12:268])
    assert torch.equal(views[1], img[:, :256, 25:])
    # tl_flip is the top-left crop of the flipped image, i.e. the mirror of tr.
    assert torch.equal(views[5], views[1].flip(-1))
    # center_flip is NOT the mirror of center when 281-256 is odd: it is cut 12 px from the flipped
    # image's left edge, i.e. 13 px from the original's left (torchvision TenCrop does the same).
    assert torch.equal(views[9], img[:, 12:268, 13:269].flip(-1))
    assert crop_geometry(256, True)["center_crop"] == 281
    assert crop_geometry(256, True)["offsets"][4] == [12, 12]


def test_center_crop_box_halving_then_bicubic():
    img = _known_image(1200, 700)  # short side 700 >= 2*281: one BOX halving to 600x350
    out = center_crop_arr(img, 281)
    half = img.resize((600, 350), resample=Image.BOX)
    resized = half.resize((round(600 * 281 / 350), 281), resample=Image.BICUBIC)
    ref = np.asarray(resized)
    left = (ref.shape[1] - 281) // 2
    assert out.shape == (281, 281, 3)
    assert np.array_equal(out, ref[:, left : left + 281])


def test_small_images_are_scaled_up_by_the_same_rule():
    img = _known_image(50, 37)
    views = crop_views(img, 64, ten=True)
    assert views.shape == (10, 3, 64, 64)
    two = crop_views(img, 64, ten=False)
    assert two.shape == (2, 3, 64, 64)
    assert torch.equal(two[1], two[0].flip(-1))
    ref = np.asarray(img.resize((round(50 * 64 / 37), 64), resample=Image.BICUBIC))
    left = (ref.shape[1] - 64) // 2
    assert np.array_equal(two[0].permute(1, 2, 0).numpy(), ref[:, left : left + 64])


def test_random_crop_is_seeded_and_in_range():
    img = _known_image(400, 300)
    a = random_crop_arr(img, 64, rng=random.Random(1))
    b = random_crop_arr(img, 64, rng=random.Random(1))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    outs = {random_crop_arr(img, 64, rng=random.Random(s)).tobytes() for s in range(6)}
    assert len(outs) > 1


def test_non_ten_crop_views_are_center_and_flip_like_torchvision():
    img = _known_image(333, 260)
    views = crop_views(img, 128, ten=False)
    square = torch.from_numpy(center_crop_arr(img, 128).copy()).permute(2, 0, 1)
    assert torch.equal(views[0], square)
    assert torch.equal(views[1], TF.hflip(square))
