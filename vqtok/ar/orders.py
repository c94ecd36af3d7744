"""Scan orders over the token grid (RAR paper Table 3) and the per-sample order sampler used in training.

An order is a LongTensor `o` of length H*W where `o[j]` is the raster position (row * W + col) of the
j-th generated token. Row-major is the identity. The six orders follow the ordering study the paper
cites (Esser et al.): row-major, spiral-in, spiral-out, z-curve, subsample and alternate, each the same
permutation as taming-transformers' `taming/modules/transformer/permuter.py` (Identity, SpiralIn, SpiralOut,
ZCurve, Subsample, AlternateParsing) on the grids it supports (square; even sides for the spirals; powers
of two for subsample), extended to any H x W grid.
"""

from __future__ import annotations

import torch

from vqtok.errors import UserError

ORDERS = ("row-major", "spiral-in", "spiral-out", "z-curve", "subsample", "alternate")
_ALIASES = {"raster": "row-major", "row_major": "row-major", "rowmajor": "row-major", "spiral_in": "spiral-in",
            "spiral_out": "spiral-out", "z_curve": "z-curve", "zcurve": "z-curve", "morton": "z-curve",
            "snake": "alternate", "boustrophedon": "alternate"}


def canonical_order_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ORDERS:
        raise UserError(f"unknown scan order '{name}'; choose one of {', '.join(ORDERS)}")
    return key


def scan_order(name: str, height: int, width: int) -> torch.Tensor:
    """The permutation (H*W,) for a named order on an H x W grid (any size, square or not)."""
    name = canonical_order_name(name)
    if height < 1 or width < 1:
        raise UserError(f"token grid must be at least 1x1, got {height}x{width}")
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    if name == "row-major":
        return torch.arange(height * width)
    if name == "alternate":  # row-major, every other row right-to-left (a snake)
        grid = torch.arange(height * width).view(height, width).clone()
        grid[1::2] = grid[1::2].flip(1)
        return grid.flatten()
    if name == "spiral-in":
        return _spiral_in(height, width)
    if name == "spiral-out":  # Esser et al.: from the centre outwards, clockwise, ending in the bottom-right corner
        return _spiral_in(height, width).flip(0)
    bits = max(1, (max(height, width) - 1).bit_length())
    if name == "z-curve":  # Morton order: interleave row and column bits, the row bit first in each pair
        key = _interleave(rows, cols, bits)
    else:  # subsample: the coarsest 2x2 lattice first, recursively, i.e. the Morton order of bit-reversed coordinates
        key = _interleave(_reverse_bits(rows, bits), _reverse_bits(cols, bits), bits)
    return torch.argsort(key, stable=True)


def _spiral_in(height: int, width: int) -> torch.Tensor:
    """taming-transformers' SpiralIn: from the bottom-right corner up the right edge, then along the top
    row leftwards, down the left edge and right along the bottom row (counter-clockwise), ring by ring,
    to the centre. Its reverse is their SpiralOut, which starts at (H/2, W/2 - 1) and turns clockwise
    (up, right, down, left). Ring peeling gives the same path on every even square grid (where theirs is
    defined) and extends it to odd and non-square grids."""
    out: list[int] = []
    top, bottom, left, right = 0, height - 1, 0, width - 1
    while top <= bottom and left <= right:
        out += [r * width + right for r in range(bottom, top - 1, -1)]  # up the right edge
        out += [top * width + c for c in range(right - 1, left - 1, -1)]  # left along the top
        if left < right:
            out += [r * width + left for r in range(top + 1, bottom + 1)]  # down the left edge
        if top < bottom:
            out += [bottom * width + c for c in range(left + 1, right)]  # right along the bottom
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return torch.tensor(out, dtype=torch.long)


def _interleave(rows: torch.Tensor, cols: torch.Tensor, bits: int) -> torch.Tensor:
    key = torch.zeros_like(rows)
    for b in range(bits):
        key |= ((rows >> b) & 1) << (2 * b + 1)
        key |= ((cols >> b) & 1) << (2 * b)
    return key


def _reverse_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    for b in range(bits):
        out |= ((x >> b) & 1) << (bits - 1 - b)
    return out


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """rank[p] = the step at which raster position p is generated."""
    return torch.argsort(order, dim=-1)


def sample_orders(
    batch: int,
    target: torch.Tensor,
    random_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, N) orders: per sample a uniform random permutation with probability `random_ratio`, else `target`.

    Vectorised: one argsort of uniform noise gives B independent uniform permutations, and one Bernoulli
    draw per sample picks between it and the target order. Both draws are made whatever the ratio, so the
    random stream (and a resumed run) does not depend on where the annealing schedule is.
    """
    if not 0.0 <= random_ratio <= 1.0:
        raise ValueError(f"random_ratio must be in [0, 1], got {random_ratio}")
    n = target.numel()
    gen_device = generator.device if generator is not None else (device or target.device)
    noise = torch.rand(batch, n, generator=generator, device=gen_device)
    pick_random = torch.rand(batch, 1, generator=generator, device=gen_device) < random_ratio
    random_perms = noise.argsort(dim=1)
    orders = torch.where(pick_random, random_perms, target.to(gen_device).view(1, n))
    return orders.to(device or target.device)
