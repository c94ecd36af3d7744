import pytest
import torch

from vqtok.ar.annealing import PermutationAnnealing, random_ratio
from vqtok.ar.orders import ORDERS, canonical_order_name, inverse_order, sample_orders, scan_order
from vqtok.errors import UserError


@pytest.mark.parametrize("name", ORDERS)
@pytest.mark.parametrize("shape", [(16, 16), (8, 8), (5, 7), (4, 6), (1, 9), (3, 1)])
def test_every_order_is_a_permutation(name, shape):
    h, w = shape
    order = scan_order(name, h, w)
    assert order.dtype == torch.long
    assert torch.equal(order.sort().values, torch.arange(h * w))


def test_row_major_is_identity_and_orders_differ():
    assert torch.equal(scan_order("row-major", 16, 16), torch.arange(256))
    assert torch.equal(scan_order("raster", 4, 5), torch.arange(20))
    all_orders = {name: tuple(scan_order(name, 16, 16).tolist()) for name in ORDERS}
    assert len(set(all_orders.values())) == len(ORDERS)


def test_alternate_reverses_every_other_row():
    assert scan_order("alternate", 3, 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]


# Esser et al. (taming-transformers, taming/modules/transformer/permuter.py), written out by hand for 4x4:
# raster positions 0..15 are row * 4 + col.
TAMING_4X4 = {
    "row-major": list(range(16)),
    # SpiralOut: start at (row 2, col 1), then up 1, right 1, down 2, left 2, up 3, right 3, down 3
    "spiral-out": [9, 5, 6, 10, 14, 13, 12, 8, 4, 0, 1, 2, 3, 7, 11, 15],
    # SpiralIn: the same path reversed
    "spiral-in": [15, 11, 7, 3, 2, 1, 0, 4, 8, 12, 13, 14, 10, 6, 5, 9],
    # ZCurve: Morton code with the row bit above the column bit
    "z-curve": [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
    # Subsample: the four stride-2 sub-lattices (offsets (0,0), (0,1), (1,0), (1,1)), each recursively
    "subsample": [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15],
    # AlternateParsing: odd rows right to left
    "alternate": [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
}


def _turtle_spiral_out(n: int) -> list[int]:
    """SpiralOut as a walk: from (n/2, n/2 - 1), legs of length 1, 1, 2, 2, 3, 3, ... turning up, right,
    down, left; the walk stops when every cell is visited (independent of vqtok's ring peeling)."""
    r, c = n // 2, n // 2 - 1
    out = [r * n + c]
    moves = [(-1, 0), (0, 1), (1, 0), (0, -1)]
    leg, turn = 1, 0
    while len(out) < n * n:
        for _ in range(2):
            dr, dc = moves[turn % 4]
            for _ in range(leg):
                r, c = r + dr, c + dc
                if 0 <= r < n and 0 <= c < n and len(out) < n * n:
                    out.append(r * n + c)
            turn += 1
        leg += 1
    return out


def _by_key(n: int, key) -> list[int]:
    return sorted(range(n * n), key=lambda p: key(p // n, p % n))


def _expected_orders(n: int) -> dict[str, list[int]]:
    bits = n.bit_length() - 1  # n is a power of two here
    msb_first = [bits - 1 - b for b in range(bits)]
    spiral_out = _turtle_spiral_out(n)
    return {
        "row-major": list(range(n * n)),
        "spiral-out": spiral_out,
        "spiral-in": spiral_out[::-1],
        # Morton: compare (row bit, col bit) pairs from the most significant down
        "z-curve": _by_key(n, lambda r, c: [((r >> b) & 1, (c >> b) & 1) for b in msb_first]),
        # Subsample: compare (row bit, col bit) pairs from the least significant up
        "subsample": _by_key(n, lambda r, c: [((r >> b) & 1, (c >> b) & 1) for b in range(bits)]),
        "alternate": [r * n + (c if r % 2 == 0 else n - 1 - c) for r in range(n) for c in range(n)],
    }


@pytest.mark.parametrize("name", ORDERS)
def test_orders_match_taming_permuter_on_4x4(name):
    assert scan_order(name, 4, 4).tolist() == TAMING_4X4[name]
    assert _expected_orders(4)[name] == TAMING_4X4[name]  # the 16x16 construction agrees with the hand-written arrays


@pytest.mark.parametrize("name", ORDERS)
def test_orders_match_taming_permuter_on_16x16(name):
    assert scan_order(name, 16, 16).tolist() == _expected_orders(16)[name]


def test_spirals_start_at_the_centre_and_turn_clockwise():
    out = scan_order("spiral-out", 16, 16).tolist()
    assert [divmod(p, 16) for p in out[:4]] == [(8, 7), (7, 7), (7, 8), (8, 8)]  # up, right, down
    assert out[-1] == 255  # ends in the bottom-right corner, having come down the right edge
    assert scan_order("spiral-in", 16, 16).tolist() == out[::-1]
    # odd and non-square grids (which taming does not support) still get a full counter-clockwise inward path
    assert scan_order("spiral-in", 3, 3).tolist() == [8, 5, 2, 1, 0, 3, 6, 7, 4]
    assert scan_order("spiral-in", 3, 4).tolist() == [11, 7, 3, 2, 1, 0, 4, 8, 9, 10, 6, 5]


def test_z_curve_is_morton_order():
    assert scan_order("z-curve", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_subsample_visits_the_coarse_lattice_first():
    order = scan_order("subsample", 16, 16)
    assert order[:4].tolist() == [0, 8, 128, 136]
    rows, cols = order // 16, order % 16
    # first quarter: all (even, even) positions; then (even, odd), (odd, even), (odd, odd)
    for q, (pr, pc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        part = slice(64 * q, 64 * (q + 1))
        assert bool(((rows[part] % 2 == pr) & (cols[part] % 2 == pc)).all())


def test_inverse_order_and_names():
    order = scan_order("spiral-in", 4, 4)
    rank = inverse_order(order)
    assert torch.equal(order[rank], torch.arange(16))
    assert canonical_order_name("Raster") == "row-major"
    with pytest.raises(UserError, match="unknown scan order"):
        scan_order("hilbert", 4, 4)


def test_sample_orders_extremes_and_mix():
    target = scan_order("spiral-in", 4, 4)
    g = torch.Generator().manual_seed(0)
    none_random = sample_orders(64, target, 0.0, generator=g)
    assert torch.equal(none_random, target.expand(64, 16))
    all_random = sample_orders(256, target, 1.0, generator=g)
    assert torch.equal(all_random.sort(dim=1).values, torch.arange(16).expand(256, 16))
    assert (all_random != target).any(dim=1).float().mean() > 0.99  # 16! permutations: the target is rare
    assert len({tuple(r) for r in all_random.tolist()}) > 250  # independent per sample
    half = sample_orders(4000, target, 0.5, generator=g)
    frac_target = (half == target).all(dim=1).float().mean().item()
    assert 0.45 < frac_target < 0.55


def test_sample_orders_is_deterministic_under_a_generator():
    target = torch.arange(16)
    a = sample_orders(8, target, 0.5, generator=torch.Generator().manual_seed(3))
    b = sample_orders(8, target, 0.5, generator=torch.Generator().manual_seed(3))
    c = sample_orders(8, target, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_ratio_schedule_corners():
    assert random_ratio(0, 200, 300) == 1.0
    assert random_ratio(199.99, 200, 300) == 1.0
    assert random_ratio(200, 200, 300) == 1.0
    assert random_ratio(250, 200, 300) == pytest.approx(0.5)
    assert random_ratio(299, 200, 300) == pytest.approx(0.01)
    assert random_ratio(300, 200, 300) == 0.0
    assert random_ratio(400, 200, 300) == 0.0
    assert random_ratio(5, 5, 5) == 0.0  # start == end: a step from random to the target order


def test_annealing_in_steps_and_epochs():
    official = PermutationAnnealing(125_000, 187_500, unit="step")
    assert official.ratio(0) == 1.0
    assert official.ratio(156_250) == pytest.approx(0.5)
    assert official.ratio(250_000) == 0.0
    epochs = PermutationAnnealing(200, 300)  # paper: 200 -> 300 of 400 epochs
    assert epochs.ratio(625 * 250, steps_per_epoch=625) == pytest.approx(0.5)
    assert epochs.ratio(625 * 100, steps_per_epoch=625) == 1.0
    with pytest.raises(UserError):
        epochs.ratio(10)
    with pytest.raises(UserError):
        PermutationAnnealing(300, 200)
    with pytest.raises(UserError):
        random_ratio(1, 3, 2)
