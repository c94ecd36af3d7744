"""Crop geometry shared with the anchors (ADM / LlamaGen / RAR), as exact pixel arithmetic.

* `center_crop_arr`: ADM's center crop. Halve with BOX while the short side is at least twice the
  target (cheap anti-aliasing), then BICUBIC so the short side equals the target, then the center
  square. Images smaller than the target are scaled up by the same BICUBIC step.
* `random_crop_arr`: ADM's training crop: the short side is drawn from [size/max_frac, size/min_frac],
  then the same resize rule, then a random square.
* `ten_crop`: torchvision TenCrop order — tl, tr, bl, br, center, then the same five of the
  horizontally flipped image (so view 5, tl_flip, mirrors view 1, tr). Without ten-crop the views are
  the center crop and its flip (`center_flip_views`).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

TEN_CROP_VIEWS = ("tl", "tr", "bl", "br", "center", "tl_flip", "tr_flip", "bl_flip", "br_flip", "center_flip")
CENTER_FLIP_VIEWS = ("center", "center_flip")


def _halve_then_bicubic(pil_image: Image.Image, short_side: int) -> Image.Image:
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short_side / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: (image_size, image_size, C) uint8 array."""
    arr = np.array(_halve_then_bicubic(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: random.Random | None = None,
) -> np.ndarray:
    """ADM random crop for training: (image_size, image_size, C) uint8 array."""
    rng = rng or random
    min_side = math.ceil(image_size / max_crop_frac)
    max_side = math.ceil(image_size / min_crop_frac)
    arr = np.array(_halve_then_bicubic(pil_image, rng.randrange(min_side, max_side + 1)))
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def _five_crop_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    # torchvision center_crop rounds with Python's round() (281 -> 256 gives offset round(12.5) = 12).
    center = (int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), center]


def ten_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (10, C, size, size) in TenCrop order; each crop is a view of `image` or its one flipped copy."""
    _, height, width = image.shape
    if height < size or width < size:
        raise ValueError(f"ten_crop needs an image of at least {size}x{size}, got {height}x{width}")
    flipped = image.flip(-1)
    offsets = _five_crop_offsets(height, width, size)
    views = [src[:, t : t + size, l : l + size] for src in (image, flipped) for t, l in offsets]
    return torch.stack(views)


def center_flip_views(image: torch.Tensor) -> torch.Tensor:
    """(C, S, S) -> (2, C, S, S): the crop itself and its horizontal flip."""
    return torch.stack([image, image.flip(-1)])


def crop_views(pil_image: Image.Image, size: int, ten: bool, crop_range: float = 1.1) -> torch.Tensor:
    """The views one input image becomes, as a (V, 3, size, size) uint8 tensor.

    Ten-crop: ADM center crop to int(size * crop_range), then TenCrop(size). Otherwise: ADM center crop
    to `size` and its flip (crop_range is not used, as in LlamaGen and RAR).
    """
    if ten:
        square = center_crop_arr(pil_image, int(size * crop_range))
        return ten_crop(torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1), size)
    square = center_crop_arr(pil_image, size)
    return center_flip_views(torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1))


def crop_geometry(size: int, ten: bool, crop_range: float = 1.1) -> dict:
    """The manifest's description of the views (enough to reproduce them)."""
    if ten:
        resize = int(size * crop_range)
        return {
            "mode": "ten_crop",
            "resize": "adm_center_crop",
            "center_crop": resize,
            "crop_range": crop_range,
            "crop": size,
            "offsets": [list(o) for o in _five_crop_offsets(resize, resize, size)],
            "views": list(TEN_CROP_VIEWS),
        }
    return {"mode": "center_flip", "resize": "adm_center_crop", "center_crop": size, "crop": size, "views": list(CENTER_FLIP_VIEWS)}
