import json

import pytest
import torch

from vqtok.errors import ConfigError, UserError
from vqtok.tokenizer.quantizers.vq import VectorQuantizer, VQConfig, nearest_code, squared_distances


def load_fixture(fixtures_dir, name):
    meta = json.loads((fixtures_dir / f"{name}.json").read_text())
    sd = {}
    for shard in meta["weights"]["files"]:
        sd.update(torch.load(fixtures_dir / shard["file"], weights_only=True))
    outputs = torch.load(fixtures_dir / meta["outputs"]["file"], weights_only=True)
    return meta, sd, outputs


def quantize_part(sd):
    return {k[len("quantize."):]: v for k, v in sd.items() if k.startswith("quantize.")}


def test_maskgit_vqgan_fixture_indices_codes_and_loss(fixtures_dir):
    meta, sd, out = load_fixture(fixtures_dir, "maskgit_vqgan")
    q_args = meta["constructor"]["quantizer"]
    vq = VectorQuantizer(codebook_size=q_args["num_embeddings"], dim=q_args["embedding_dim"],
                         beta=q_args["commitment_cost"], beta_on="codebook").eval()
    vq.load_state_dict(quantize_part(sd), strict=True)
    z = out["encoder_features"]
    z_q, idx, aux = vq(z)
    assert torch.equal(idx.reshape(z.shape[0], -1), out["indices"])
    torch.testing.assert_close(z_q, out["quantized"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(aux["loss"], torch.tensor(float(out["quantizer_loss"])), atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(vq.indices_to_codes(idx), out["quantized"], atol=0, rtol=0)


def test_llamagen_fixture_l2norm_search_losses_and_strict_buffer(fixtures_dir):
    meta, sd, out = load_fixture(fixtures_dir, "llamagen_vq")
    args = meta["constructor"]["model_args"]
    vq = VectorQuantizer(codebook_size=args["codebook_size"], dim=args["codebook_embed_dim"], l2_norm=True,
                         beta=args["commit_loss_beta"], usage_buffer=65536).eval()
    vq.load_state_dict(quantize_part(sd), strict=True)  # needs the codebook_used buffer
    z = out["pre_quant_z"]
    z_q, idx, aux = vq(z)
    assert torch.equal(idx.reshape(-1), out["indices"])
    torch.testing.assert_close(z_q, out["quant"], atol=2e-7, rtol=1e-5)
    torch.testing.assert_close(vq.indices_to_codes(idx), out["codebook_entry"], atol=1e-6, rtol=1e-5)
    vq.train()
    _, _, aux = vq(z)
    torch.testing.assert_close(aux["codebook_loss"], torch.tensor(float(out["train_mode_vq_loss"])), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(0.25 * aux["commitment_loss"], torch.tensor(float(out["train_mode_commit_loss"])),
                               atol=1e-6, rtol=1e-5)
    # the training forward pushed this batch's indices into the tail of the usage window
    assert torch.equal(vq.codebook_used[-idx.numel():].long(), idx.reshape(-1))


def test_stored_codebook_is_not_normalised_but_used_normalised():
    vq = VectorQuantizer(codebook_size=4, dim=2, l2_norm=True)
    vq.embedding.weight.data = torch.tensor([[3.0, 0.0], [0.0, 0.1], [-5.0, 0.0], [0.0, -2.0]])
    z = torch.tensor([0.05, 1.0]).view(1, 2, 1, 1)  # nearest by L2 to raw row 0 would be row 1 too, use cosine
    z_q, idx, _ = vq(z)
    assert idx.item() == 1
    torch.testing.assert_close(z_q.flatten(), torch.tensor([0.0, 1.0]))
    assert vq.embedding.weight[0, 0].item() == 3.0


def test_nearest_code_blocks_match_full_search(monkeypatch):
    import vqtok.tokenizer.quantizers.vq as vq_mod

    z, cb = torch.randn(257, 6), torch.randn(50, 6)
    full = squared_distances(z, cb).argmin(1)
    monkeypatch.setattr(vq_mod, "_DISTANCE_BLOCK_ELEMENTS", 50 * 7)  # 7 rows per block
    assert torch.equal(nearest_code(z, cb), full)
    cos = (torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(cb, dim=1).t()).argmax(1)
    assert torch.equal(nearest_code(z, cb, l2_norm=True), cos)


def _two_code_quantizer(beta_on):
    vq = VectorQuantizer(codebook_size=2, dim=2, beta=0.25, beta_on=beta_on)
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    return vq


@pytest.mark.parametrize("beta_on", ["commitment", "codebook"])
def test_loss_values_and_where_beta_goes(beta_on):
    vq = _two_code_quantizer(beta_on)
    z = torch.tensor([0.2, 0.4]).view(1, 2, 1, 1).requires_grad_(True)
    z_q, idx, aux = vq(z)
    assert idx.item() == 0
    mse = (0.2**2 + 0.4**2) / 2
    torch.testing.assert_close(aux["loss"], torch.tensor(1.25 * mse))
    aux["loss"].backward()
    # d/dz of w * mean((z - sg(e))^2) = w * (z - e): w = beta for "commitment", 1 for "codebook"
    w_z, w_e = (0.25, 1.0) if beta_on == "commitment" else (1.0, 0.25)
    torch.testing.assert_close(z.grad.flatten(), w_z * torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(vq.embedding.weight.grad[0], -w_e * torch.tensor([0.2, 0.4]))
    assert vq.embedding.weight.grad[1].abs().sum() == 0


@pytest.mark.parametrize("codebook_dim", [None, 3])
def test_straight_through_gradient_reaches_encoder(codebook_dim):
    vq = VectorQuantizer(codebook_size=16, dim=8, codebook_dim=codebook_dim)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, idx, _ = vq(z)
    assert idx.shape == (2, 3, 3) and idx.dtype == torch.int64
    (z_q * torch.arange(8.0).view(1, 8, 1, 1)).sum().backward()
    if codebook_dim is None:  # identity backward: the upstream gradient arrives unchanged
        torch.testing.assert_close(z.grad, torch.arange(8.0).view(1, 8, 1, 1).expand_as(z))
    else:
        assert z.grad.abs().sum() > 0
        assert vq.project_in.weight.shape == (3, 8) and vq.embedding.weight.shape == (16, 3)
        torch.testing.assert_close(vq.indices_to_codes(idx), z_q.detach(), atol=1e-6, rtol=1e-6)


def test_usage_and_perplexity():
    vq = VectorQuantizer(codebook_size=4, dim=1)
    vq.embedding.weight.data = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    z = torch.tensor([0.1, 0.9, 0.0, 1.1]).view(1, 1, 2, 2)
    _, idx, aux = vq(z)
    assert idx.flatten().tolist() == [0, 1, 0, 1]
    assert aux["usage"].item() == 0.5
    torch.testing.assert_close(aux["perplexity"], torch.tensor(2.0))


def test_ema_moves_codes_to_the_mean_of_their_vectors():
    vq = VectorQuantizer(codebook_size=2, dim=2, ema=True, ema_decay=0.5, ema_eps=0.0).train()
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq.ema_embed_sum.copy_(vq.embedding.weight.data)
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0]]).t().reshape(1, 2, 1, 2)  # two vectors, both nearest to code 0
    for _ in range(30):
        vq(z)
        vq.update_codebook()
    torch.testing.assert_close(vq.embedding.weight[0], torch.tensor([2.0, 1.0]), atol=1e-3, rtol=0)
    assert not vq.embedding.weight.requires_grad
    # first step by hand: size 1 -> 0.5*1 + 0.5*2 = 1.5, sum (0,0) -> 0.5*(4,2) = (2,1); code 1's size decays
    vq2 = VectorQuantizer(codebook_size=2, dim=2, ema=True, ema_decay=0.5, ema_eps=0.0).train()
    vq2.embedding.weight.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq2.ema_embed_sum.copy_(vq2.embedding.weight.data)
    vq2(z)
    torch.testing.assert_close(vq2.ema_cluster_size, torch.ones(2))  # the forward only records
    vq2.update_codebook()
    torch.testing.assert_close(vq2.ema_cluster_size, torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(vq2.ema_embed_sum[0], torch.tensor([2.0, 1.0]))
    # Laplace-smoothed sizes (eps 0) equal the raw ones: row 0 = (2,1)/1.5
    torch.testing.assert_close(vq2.embedding.weight[0], torch.tensor([2.0, 1.0]) / 1.5)


def test_kmeans_init_finds_clusters_on_first_training_batch():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    pts = centers.repeat_interleave(16, 0) + 0.1 * torch.randn(64, 2)
    z = pts.t().reshape(1, 2, 8, 8)
    vq = VectorQuantizer(codebook_size=4, dim=2, kmeans_init=True, ema=True).train()
    vq.eval()
    vq(z)
    vq.update_codebook()
    assert not bool(vq.initialized)  # eval forwards record nothing, so nothing initialises
    vq.train()
    vq(z)
    assert not bool(vq.initialized)  # the forward only records
    update = vq.update_codebook()
    assert bool(vq.initialized) and bool(update.replaced.all())
    _, idx, aux = vq(z)
    # every center has its own code within 0.2 (noise is 0.1)
    dist_to_nearest_code = torch.cdist(centers, vq.embedding.weight).min(1)
    assert dist_to_nearest_code.values.max() < 0.2
    assert sorted(dist_to_nearest_code.indices.tolist()) == [0, 1, 2, 3]
    assert aux["usage"].item() == 1.0
    torch.testing.assert_close(vq.ema_cluster_size.sum(), torch.tensor(64.0), atol=1.0, rtol=0)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_restart_from_batch_vectors(ema):
    vq = VectorQuantizer(codebook_size=3, dim=2, ema=ema, ema_decay=0.5, dead_code_threshold=0.5).train()
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])
    if ema:
        vq.ema_embed_sum.copy_(vq.embedding.weight.data)
    z = torch.tensor([[0.1, 0.0], [0.9, 1.0], [0.0, 0.2], [1.1, 1.0]]).t().reshape(1, 2, 2, 2)
    batch = z.permute(0, 2, 3, 1).reshape(-1, 2)
    vq(z)
    assert vq.update_codebook().replaced is None  # code 2's size 1 -> 0.5: not yet below the threshold
    assert vq.embedding.weight[2, 0].item() > 99.0
    vq(z)
    update = vq.update_codebook()  # 0.25 < 0.5: restarted from one of the batch vectors
    assert update.replaced.tolist() == [False, False, True]
    row = vq.embedding.weight[2]
    assert any(torch.allclose(row, b) for b in batch)
    assert vq.ema_cluster_size[2].item() == 0.5


def test_autocast_bf16_gives_fp32_indices_and_keeps_dtype():
    vq = VectorQuantizer(codebook_size=64, dim=16, codebook_dim=8)
    z = torch.randn(2, 16, 4, 4)
    _, idx_ref, _ = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, aux = vq(z)
    assert torch.equal(idx, idx_ref)
    assert z_q.dtype == torch.float32 and aux["loss"].dtype == torch.float32
    z_q16, idx16, _ = vq(z.to(torch.bfloat16))
    assert z_q16.dtype == torch.bfloat16


def test_entropy_term_adds_to_loss():
    vq = VectorQuantizer(codebook_size=8, dim=4, entropy_weight=0.1)
    _, _, aux = vq(torch.randn(2, 4, 2, 2))
    torch.testing.assert_close(aux["loss"], aux["codebook_loss"] + 0.25 * aux["commitment_loss"]
                               + 0.1 * aux["entropy_loss"])


def test_bad_indices_and_bad_config_are_user_errors():
    vq = VectorQuantizer(codebook_size=8, dim=4)
    with pytest.raises(UserError, match="outside the codebook"):
        vq.indices_to_codes(torch.tensor([[[8]]]))
    with pytest.raises(ConfigError, match="beta_on"):
        VQConfig(beta_on="legacy")
    with pytest.raises(ConfigError, match="ema_decay"):
        VQConfig(ema_decay=1.0)
