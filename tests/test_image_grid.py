"""Grids: one row per class with its name, captioned reconstruction pairs, nearest upscaling, white cells."""

import numpy as np
import pytest
import torch

from vqtok.image_grid import (
    MIN_CELL,
    class_label,
    labelled_grid,
    make_grid,
    reconstruction_grid,
    sample_grid,
    upscale_factor,
    upscale_nearest,
)


def _solid(colors: list[tuple[float, float, float]], side: int = 64) -> torch.Tensor:
    return torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, side, side) for c in colors]).float()


def test_nearest_upscaling_keeps_every_pixel():
    x = torch.rand(2, 3, 64, 64)
    k = upscale_factor(64)
    assert k == 4 and upscale_factor(256) == 1 and upscale_factor(300) == 1 and upscale_factor(100) == 3
    big = upscale_nearest(x, k)
    assert big.shape == (2, 3, 256, 256)
    assert torch.equal(big[:, :, ::k, ::k], x) and torch.equal(big[:, :, 3::k, 3::k], x)


def test_empty_cells_are_white_for_float_and_uint8():
    for images, white in ((torch.zeros(3, 3, 4, 4), 1.0), (torch.zeros(3, 3, 4, 4, dtype=torch.uint8), 255)):
        grid = make_grid(images, rows=2)  # 2x2 cells, the last one empty
        assert grid.shape == (3, 8, 8)
        assert (grid[:, 4:, 4:] == white).all() and (grid[:, :4, :4] == 0).all()


def test_sample_grid_has_one_row_per_class_with_its_name():
    red, green, blue = (1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)
    images = _solid([red, green, red, blue, green, red])  # classes 2, 0, 2, 1, 0, 2
    labels = [2, 0, 2, 1, 0, 2]
    grid = sample_grid(images, labels, ["cat", "coffee", "rocket"])
    cell = upscale_factor(64) * 64
    assert cell >= MIN_CELL
    gap = max(2, cell // 64)
    rows, cols = 3, 3  # classes in first-appearance order: 2 (3 images), 0 (2), 1 (1)
    assert grid.shape[1] == rows * cell + (rows - 1) * gap
    label_w = grid.shape[2] - cols * cell - (cols - 1) * gap
    assert label_w > 0

    def cell_at(r, c):
        y, x = r * (cell + gap), label_w + c * (cell + gap)
        return grid[:, y : y + cell, x : x + cell]

    assert torch.equal(cell_at(0, 0)[:, 0, 0], torch.tensor(red)) and torch.equal(cell_at(0, 2)[:, 5, 5], torch.tensor(red))
    assert torch.equal(cell_at(1, 1)[:, 0, 0], torch.tensor(green))
    assert torch.equal(cell_at(2, 0)[:, 0, 0], torch.tensor(blue))
    assert (cell_at(2, 1) == 1).all() and (cell_at(1, 2) == 1).all()  # short rows end in white cells
    # the name column holds dark text on white in every row
    for r in range(rows):
        label = grid[:, r * (cell + gap) : r * (cell + gap) + cell, :label_w]
        assert (label < 0.3).any() and (label == 1).float().mean() > 0.8
    assert class_label(2, ["cat", "coffee", "rocket"]) == "rocket (2)" and class_label(7, ["cat"]) == "7"


def test_labelled_grid_of_uint8_samples_ends_short_rows_in_white_cells():
    black = np.zeros((3, 64, 64, 3), dtype=np.uint8)  # class 0 twice, class 1 once: row 1 has one empty cell
    image = labelled_grid(black, np.array([0, 0, 1]), ["cat", "dog"])
    arr = np.asarray(image)
    cell = upscale_factor(64) * 64
    gap = max(2, cell // 64)
    assert image.mode == "RGB" and arr.shape[0] == 2 * cell + gap
    label_w = arr.shape[1] - 2 * cell - gap
    row1 = arr[cell + gap :, label_w:]
    assert (row1[:, :cell] == 0).all()  # the one sample of class 1 is drawn as given
    assert (row1[:, cell + gap :] == 255).all()  # the empty cell after it is white, not black
    assert (arr[:cell, label_w : label_w + cell] == 0).all() and (arr[:cell, label_w + cell + gap :] == 0).all()


def test_sample_grid_accepts_uint8_and_checks_lengths():
    images = (torch.rand(4, 3, 300, 300) * 255).to(torch.uint8)
    grid = sample_grid(images, [0, 0, 1, 1])
    assert grid.dtype == torch.float32 and grid.shape[1] == 2 * 300 + max(2, 300 // 64)  # large: no upscaling
    with pytest.raises(ValueError):
        sample_grid(images, [0, 1])


def test_reconstruction_grid_captions_columns_and_upscales():
    originals = _solid([(1.0, 0, 0)] * 4, side=32)
    recons = _solid([(0, 0, 1.0)] * 4, side=32)
    grid = reconstruction_grid(originals, recons, pairs_per_row=2)
    k = upscale_factor(32)
    cell = 32 * k
    assert cell >= MIN_CELL
    seam, gap = max(2, cell // 64), max(4, cell // 16)
    assert grid.shape[2] == 2 * (2 * cell + seam) + gap
    caption_h = grid.shape[1] - 2 * cell - gap
    assert caption_h > 0
    caption = grid[:, :caption_h]
    assert (caption < 0.3).any()  # the words are drawn
    first_row = grid[:, caption_h : caption_h + cell]
    assert (first_row[:, :, :cell] == torch.tensor([1.0, 0, 0]).view(3, 1, 1)).all()
    assert (first_row[:, :, cell + seam : 2 * cell + seam] == torch.tensor([0, 0, 1.0]).view(3, 1, 1)).all()
    assert (first_row[:, :, cell : cell + seam] == 1).all()


def test_tokenizer_previews_draw_other_images_across_the_run(tmp_path):
    from PIL import Image

    from vqtok.data.images import list_images
    from vqtok.train.image_dataset import preview_images

    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    records = list_images(str(tmp_path)).records
    first = preview_images(records, 32, 4)
    a, b = preview_images(records, 32, 4, draw=10), preview_images(records, 32, 4, draw=20)
    assert not torch.equal(a, b) and not torch.equal(a, first)
    assert torch.equal(a, preview_images(records, 32, 4, draw=10))  # the same on every rank and rerun
