import pytest
import torch
import torch.nn.functional as F

from vqtok.errors import ConfigError, UserError
from vqtok.tokenizer.quantizers.lfq import (
    LFQ,
    average_code_probs,
    bits_to_indices,
    convert_bit_order,
    indices_to_bits,
    per_sample_entropy,
)


def brute_force_entropies(x, scale, temperature, bit_order, eps):
    """The anchors' formulation: softmax over all 2^K codes."""
    K = x.shape[1]
    codes = indices_to_bits(torch.arange(2**K), K, bit_order).double() * (2 * scale) - scale
    logits = 2 * x @ codes.t() / temperature
    probs = logits.softmax(-1)
    sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    book = -(avg * torch.log(avg + eps)).sum()
    return sample, book, avg


def test_bit_orders_and_conversion():
    bits = torch.tensor([1, 0, 0, 1, 1])
    assert bits_to_indices(bits, "msb").item() == 0b10011
    assert bits_to_indices(bits, "lsb").item() == 0b11001
    idx = torch.arange(2**10)
    for order in ("msb", "lsb"):
        assert torch.equal(bits_to_indices(indices_to_bits(idx, 10, order), order), idx)
    assert torch.equal(convert_bit_order(convert_bit_order(idx, 10), 10), idx)
    msb = LFQ(codebook_size=2**5, bit_order="msb")
    lsb = LFQ(codebook_size=2**5, bit_order="lsb")
    z = torch.randn(2, 5, 3, 3)
    _, i_msb, _ = msb(z)
    _, i_lsb, _ = lsb(z)
    assert torch.equal(convert_bit_order(i_msb, 5), i_lsb)
    # channel 0 is the top bit in msb order, bit 0 in lsb order
    one_hot = torch.tensor([1.0, -1, -1, -1, -1]).view(1, 5, 1, 1)
    assert msb(one_hot)[1].item() == 16 and lsb(one_hot)[1].item() == 1


@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_codes_bijection_and_forward_values(order):
    q = LFQ(codebook_size=2**6, codebook_scale=0.5, bit_order=order, entropy_weight=0.0)
    idx = torch.arange(64).view(1, 8, 8)
    codes = q.indices_to_codes(idx)
    assert set(codes.unique().tolist()) == {-0.5, 0.5}
    z_q, back, _ = q(codes)
    assert torch.equal(back, idx)
    torch.testing.assert_close(z_q, codes)


@pytest.mark.parametrize("K", [8, 10])
@pytest.mark.parametrize("order", ["msb", "lsb"])
def test_entropies_equal_brute_force_in_value_and_gradient(K, order):
    torch.manual_seed(K)
    x = (torch.randn(37, K, dtype=torch.float64) * 0.01).requires_grad_(True)  # T=0.01: keep probs soft
    scale, T, eps = 1.0, 0.01, 1e-5
    s_ref, b_ref, avg_ref = brute_force_entropies(x, scale, T, order, eps)
    g_ref = torch.autograd.grad(s_ref - 2.5 * b_ref, x)[0]
    s = per_sample_entropy(x, scale, T)
    avg = average_code_probs(x, scale, T, order)
    b = -(avg * torch.log(avg + eps)).sum()
    torch.testing.assert_close(avg, avg_ref, atol=1e-12, rtol=1e-9)  # in index order, too
    torch.testing.assert_close(s, s_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(b, b_ref, atol=1e-9, rtol=1e-9)
    g = torch.autograd.grad(s - 2.5 * b, x)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


def test_module_loss_is_the_weighted_sum_and_matches_brute_force():
    q = LFQ(codebook_size=2**8, entropy_weight=0.1, diversity_gamma=2.5, commitment_weight=0.25, codebook_scale=0.5)
    z = torch.randn(2, 8, 4, 4) * 0.01
    _, _, aux = q(z)
    x = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    s_ref, b_ref, _ = brute_force_entropies(x, 0.5, 0.01, "msb", 1e-5)
    torch.testing.assert_close(aux["per_sample_entropy"].double(), s_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux["codebook_entropy"].double(), b_ref, atol=1e-5, rtol=1e-5)
    commit = F.mse_loss(x, torch.where(x > 0, 0.5, -0.5))
    want = 0.1 * (s_ref - 2.5 * b_ref) + 0.25 * commit
    torch.testing.assert_close(aux["loss"].double(), want, atol=1e-5, rtol=1e-5)


def test_straight_through_and_entropy_gradients_reach_the_encoder():
    q = LFQ(codebook_size=2**6, dim=12)  # projections 12 -> 6 -> 12
    z = torch.randn(2, 12, 2, 2, requires_grad=True)
    z_q, idx, aux = q(z)
    assert idx.shape == (2, 2, 2) and idx.dtype == torch.int64
    torch.testing.assert_close(q.indices_to_codes(idx), z_q.detach(), atol=1e-6, rtol=1e-6)
    (z_q.sum() + aux["loss"]).backward()
    assert z.grad.abs().sum() > 0
    plain = LFQ(codebook_size=2**4, entropy_weight=0.0, commitment_weight=0.0)
    x = torch.randn(1, 4, 2, 2, requires_grad=True)
    (plain(x)[0] * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_large_codebook_entropy_stays_small_in_memory():
    # 2^18 codes, 512 tokens: a naive softmax would hold 512 x 262144 floats (512 MiB) per tensor
    q = LFQ(codebook_size=2**18)
    z = torch.randn(2, 18, 16, 16, requires_grad=True)
    _, idx, aux = q(z)
    aux["loss"].backward()
    assert 0 < aux["codebook_entropy"] <= 18 * 0.6932 and int(idx.max()) < 2**18
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_autocast_bf16_keeps_fp32_indices_and_losses():
    q = LFQ(codebook_size=2**10, dim=16)
    z = torch.randn(2, 16, 4, 4)
    _, ref, aux_ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, aux = q(z)
    assert torch.equal(idx, ref) and aux["loss"].dtype == torch.float32 and z_q.dtype == torch.float32
    torch.testing.assert_close(aux["loss"], aux_ref["loss"])


def test_bad_config_and_indices():
    with pytest.raises(ConfigError, match="power of two"):
        LFQ(codebook_size=1000)
    with pytest.raises(ConfigError, match="bit_order"):
        LFQ(codebook_size=16, bit_order="little")
    with pytest.raises(UserError, match="outside the codebook"):
        LFQ(codebook_size=16).indices_to_codes(torch.tensor([[[16]]]))


def _ddp_worker(rank, world, init_file, xs, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = LFQ(codebook_size=2**6, entropy_weight=1.0, commitment_weight=0.0, diversity_gamma=1.0)
        x = xs[rank].clone().requires_grad_(True)
        _, idx, aux = q(x)
        aux["loss"].backward()
        out[rank] = (aux["codebook_entropy"].item(), x.grad.clone(), aux["usage"].item())
    finally:
        dist.destroy_process_group()


def test_codebook_entropy_all_reduced_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    xs = [torch.randn(1, 6, 2, 2) * 0.01, torch.randn(1, 6, 2, 2) * 0.01]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), xs, out), nprocs=2, join=True)
    # one process over both ranks' tokens gives the global codebook entropy and its gradient
    q = LFQ(codebook_size=2**6, entropy_weight=1.0, commitment_weight=0.0, diversity_gamma=1.0)
    x = torch.cat(xs, 0).requires_grad_(True)
    _, idx, aux = q(x)
    aux["loss"].backward()
    for rank in range(2):
        book, grad, usage = out[rank]
        assert abs(book - aux["codebook_entropy"].item()) < 1e-5
        # usage is this rank's own batch (never all-reduced in a forward; the trainer reduces it at log steps)
        _, _, own = LFQ(codebook_size=2**6, entropy_weight=1.0, commitment_weight=0.0, diversity_gamma=1.0)(xs[rank])
        assert abs(usage - own["usage"].item()) < 1e-6
        # each rank holds d(its own loss)/d(its tokens); DDP's gradient averaging over 2 ranks then gives
        # the global gradient, so the per-rank gradient is world_size times the single-process one
        torch.testing.assert_close(grad / 2, x.grad[rank:rank + 1], atol=1e-6, rtol=1e-4)
