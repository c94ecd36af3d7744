import math

import pytest
import torch

from vqtok.errors import ConfigError, UserError
from vqtok.tokenizer.quantizers.fsq import FSQ, FSQ_LEVEL_PRESETS, fsq_levels_for


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 6, 5], [3, 4]])
def test_indices_codes_bijection(levels):
    fsq = FSQ(levels=levels)
    n = math.prod(levels)
    assert fsq.codebook_size == n
    idx = torch.arange(n)
    codes = fsq.indices_to_normalized_codes(idx)
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    assert len({tuple(c) for c in codes.tolist()}) == n  # all codes distinct


def test_code_values_and_mixed_radix_order():
    fsq = FSQ(levels=[8, 5])
    codes = fsq.indices_to_normalized_codes(torch.arange(40))
    # even L is asymmetric, odd L symmetric
    assert sorted(set(codes[:, 0].tolist())) == [-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75]
    assert sorted(set(codes[:, 1].tolist())) == [-1, -0.5, 0, 0.5, 1]
    # first channel least significant: index 1 steps channel 0, index 8 steps channel 1
    assert codes[1].tolist() == [-0.75, -1.0] and codes[8].tolist() == [-1.0, -0.5]


def test_bound_follows_the_plus_eps_atanh_form():
    fsq = FSQ(levels=[8, 5])
    assert torch.allclose(fsq.bound(torch.zeros(2)), torch.zeros(2), atol=1e-6)  # the shift makes f(0) = 0
    half_l = torch.tensor([7 * 1.001 / 2, 4 * 1.001 / 2])
    big = fsq.bound(torch.full((2,), 50.0))
    torch.testing.assert_close(big, half_l - torch.tensor([0.5, 0.0]))


def test_forward_matches_indices_to_codes_and_grad_flows():
    fsq = FSQ(levels=[8, 5, 5, 5], dim=16)  # projections 16 -> 4 -> 16
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    z_q, idx, aux = fsq(z)
    assert idx.shape == (2, 3, 3) and idx.dtype == torch.int64 and aux["loss"].item() == 0
    torch.testing.assert_close(fsq.indices_to_codes(idx), z_q.detach(), atol=1e-6, rtol=1e-6)
    z_q.sum().backward()
    assert z.grad.abs().sum() > 0
    plain = FSQ(levels=[5, 5])
    x = torch.tensor([0.1, -0.3]).view(1, 2, 1, 1).requires_grad_(True)
    y, _, _ = plain(x)
    y.sum().backward()
    # straight-through round: the gradient is that of the smooth bound, d/dz tanh(z) * half_l / (L//2)
    want = (1 - torch.tanh(x.detach()) ** 2) * 4 * 1.001 / 2 / 2
    torch.testing.assert_close(x.grad, want)


def test_all_codes_reachable_and_usage():
    fsq = FSQ(levels=[3, 3])
    grid = torch.tensor([-3.0, 0.0, 3.0])
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).reshape(2, 9).t().reshape(1, 3, 3, 2).permute(0, 3, 1, 2)
    _, idx, aux = fsq(z.contiguous())
    assert sorted(idx.flatten().tolist()) == list(range(9))
    assert aux["usage"].item() == 1.0
    torch.testing.assert_close(aux["perplexity"], torch.tensor(9.0))


def test_bf16_autocast_and_bf16_inputs_keep_exact_indices():
    fsq = FSQ(levels=[8, 8, 8, 5, 5, 5])  # 64000 codes: bf16 cannot even represent every index
    z = torch.randn(4, 6, 8, 8) * 2
    _, ref, _ = fsq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx, _ = fsq(z)
    assert torch.equal(idx, ref)
    zb = z.to(torch.bfloat16)
    z_q, idx_b, _ = fsq(zb)
    _, ref_b, _ = fsq(zb.float())
    assert torch.equal(idx_b, ref_b) and z_q.dtype == torch.bfloat16
    assert int(idx_b.max()) < 64000


def test_presets_are_the_papers_table():
    sizes = {k: math.prod(v) for k, v in FSQ_LEVEL_PRESETS.items()}
    assert sizes == {256: 240, 1024: 1000, 4096: 4375, 16384: 15360, 65536: 64000}
    assert fsq_levels_for(1024) == [8, 5, 5, 5]
    with pytest.raises(ConfigError, match="no FSQ level preset"):
        fsq_levels_for(1000)


def test_level_two_and_bad_indices_are_rejected():
    with pytest.raises(ConfigError, match="at least 3"):
        FSQ(levels=[8, 2, 5])
    with pytest.raises(UserError, match="outside the codebook"):
        FSQ(levels=[3, 3]).indices_to_codes(torch.tensor([[[9]]]))
