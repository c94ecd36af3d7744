"""Image grids for preview PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """(N,3,H,W) in [0,1] -> (3, rows*H, cols*W) with images laid out row by row."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    grid = images.new_ones(c, rows * h, cols * w)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return grid


def save_image_grid(grid: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (grid.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    tmp.replace(path)
