"""The one image-grid module: training previews, `reconstruct`'s grid.png and `sample`'s grid.png.

All grids share three rules: small images are upscaled with nearest-neighbour (every code's pixels stay
sharp) to at least `MIN_CELL` px per cell; empty cells and margins are white; a grid says what it shows in
text drawn into it (a caption row over reconstruction pairs, the class name at the start of each sample row).
Tensors are (3, H, W) floats in [0, 1] until `to_pil` converts them (`save_image_grid` writes a PNG).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from PIL import Image, ImageDraw, ImageFont

from vqtok.atomic_files import atomic_write_png

MIN_CELL = 256  # px per grid cell after upscaling
MAX_SAMPLE_ROWS = 16  # classes shown in a sample grid


def make_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(N,3,H,W) -> (3, rows*H, cols*W) with images laid out row by row; empty cells white (any dtype)."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    white = 255 if images.dtype == torch.uint8 else 1.0
    grid = images.new_full((c, rows * h, cols * w), white)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return grid


def upscale_factor(side: int, min_side: int = MIN_CELL) -> int:
    """The integer nearest-neighbour factor that brings `side` px to at least `min_side` px."""
    return max(1, math.ceil(min_side / max(1, side)))


def upscale_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(..., H, W) -> (..., H*factor, W*factor), each pixel repeated (no smoothing)."""
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_width(text: str, font_size: int) -> int:
    left, _, right, _ = _font(font_size).getbbox(text)
    return int(right - left)


def text_tile(text: str, width: int, height: int, font_size: int, align: str = "center") -> torch.Tensor:
    """A white (3, height, width) tile with `text` in black, centred (or left-aligned) and vertically centred."""
    img = Image.new("RGB", (max(1, width), max(1, height)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (width - (right - left)) // 2 - left if align == "center" else max(0, font_size // 2) - left
    y = (height - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def _font_size(cell: int) -> int:
    return max(12, cell // 12)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.detach().float().clamp(0, 1).cpu()


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, pairs_per_row: int | None = None) -> torch.Tensor:
    """Pairs side by side (original | reconstruction) under a caption row naming the two columns.

    (N,3,H,W) twice -> (3, H', W'); roughly square overall unless `pairs_per_row` is given; upscaled
    (nearest) to >= MIN_CELL px per image; white gaps between pairs.
    """
    originals, reconstructions = _to_float(originals), _to_float(reconstructions)
    n, _, h, w = originals.shape
    if pairs_per_row is None:
        pairs_per_row = max(1, round(math.sqrt(n / 2)))  # a pair is 2:1, so this is roughly square
    pairs_per_row = min(pairs_per_row, n)
    k = upscale_factor(min(h, w))
    H, W = h * k, w * k
    gap = max(4, W // 16)
    font = _font_size(W)
    caption_h = int(font * 1.8)
    rows = -(-n // pairs_per_row)
    seam = max(2, W // 64)  # a thin white line between an original and its reconstruction
    pair_w = 2 * W + seam
    grid = torch.ones(3, caption_h + rows * H + (rows - 1) * gap, pairs_per_row * pair_w + (pairs_per_row - 1) * gap)
    for j in range(pairs_per_row):
        x = j * (pair_w + gap)
        grid[:, :caption_h, x : x + W] = text_tile("original", W, caption_h, font)
        grid[:, :caption_h, x + W + seam : x + pair_w] = text_tile("reconstruction", W, caption_h, font)
    big_o, big_r = upscale_nearest(originals, k), upscale_nearest(reconstructions, k)
    for i in range(n):
        r, j = divmod(i, pairs_per_row)
        y, x = caption_h + r * (H + gap), j * (pair_w + gap)
        grid[:, y : y + H, x : x + W] = big_o[i]
        grid[:, y : y + H, x + W + seam : x + pair_w] = big_r[i]
    return grid


def class_label(label: int, class_names: Sequence[str] | None) -> str:
    """'coffee (2)' when the name is known, else the id."""
    if class_names is not None and 0 <= label < len(class_names):
        return f"{class_names[label]} ({label})"
    return str(label)


def sample_grid(images: torch.Tensor, labels: Sequence[int], class_names: Sequence[str] | None = None,
                max_rows: int = MAX_SAMPLE_ROWS) -> torch.Tensor:
    """One row per class (in order of first appearance, at most `max_rows`), its name at the row's start.

    images (N,3,H,W) float in [0,1] or uint8; labels (N,) class ids; rows are as long as the class with
    the most images, shorter rows end in white cells. Upscaled (nearest) to >= MIN_CELL px per image.
    """
    images = _to_float(images)
    labels = [int(x) for x in labels]
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        if label in by_class or len(by_class) < max_rows:
            by_class.setdefault(label, []).append(i)
    _, _, h, w = images.shape
    k = upscale_factor(min(h, w))
    H, W = h * k, w * k
    font = _font_size(W)
    label_w = 2 * W  # the widest name column; longer names are cut with an ellipsis
    names = {label: _fit(class_label(label, class_names), label_w - font, font) for label in by_class}
    label_w = min(label_w, max(text_width(t, font) for t in names.values()) + font) if names else 0
    cols = max((len(v) for v in by_class.values()), default=1)
    gap = max(2, W // 64)
    rows = max(1, len(by_class))
    grid = torch.ones(3, rows * H + (rows - 1) * gap, label_w + cols * W + (cols - 1) * gap)
    big = upscale_nearest(images, k)
    for r, (label, members) in enumerate(by_class.items()):
        y = r * (H + gap)
        grid[:, y : y + H, :label_w] = text_tile(names[label], label_w, H, font, align="left")
        for c, i in enumerate(members):
            x = label_w + c * (W + gap)
            grid[:, y : y + H, x : x + W] = big[i]
    return grid


def _fit(text: str, width: int, font_size: int) -> str:
    if text_width(text, font_size) <= width:
        return text
    while len(text) > 1 and text_width(text + "...", font_size) > width:
        text = text[:-1]
    return text + "..."


def labelled_grid(images: np.ndarray, labels: Sequence[int] | np.ndarray,
                  class_names: Sequence[str] | None = None) -> Image.Image:
    """uint8 (N, H, W, 3) samples -> a PIL image of `sample_grid` (one row per class, named; white empty cells)."""
    nchw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return to_pil(sample_grid(nchw, [int(x) for x in labels], class_names))


def to_pil(grid: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> an RGB PIL image (values rounded to the nearest 8-bit level)."""
    arr = grid.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def save_image_grid(grid: torch.Tensor, path: Path) -> None:
    """Write `grid` as a PNG at `path`; a reader never sees a half-written file, and a full disk keeps the
    previous one (vqtok.atomic_files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_png(path, to_pil(grid))
