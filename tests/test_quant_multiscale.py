import json

import pytest
import torch
import torch.nn.functional as F

from vqtok.config import from_dict
from vqtok.errors import UserError
from vqtok.tokenizer.quantizers.multiscale import (
    MultiScaleResidualVQ,
    MultiScaleVQConfig,
    phi_index_table,
    phi_ticks,
)


def load_var_fixture(fixtures_dir):
    meta = json.loads((fixtures_dir / "var_vqvae.json").read_text())
    sd = {}
    for shard in meta["weights"]["files"]:
        sd.update(torch.load(fixtures_dir / shard["file"], weights_only=True))
    outputs = torch.load(fixtures_dir / meta["outputs"]["files"][0], weights_only=True)
    kw = meta["constructor"]["kwargs"]
    q = MultiScaleResidualVQ(codebook_size=kw["vocab_size"], dim=kw["z_channels"], patch_nums=tuple(kw["v_patch_nums"]),
                             beta=kw["beta"], quant_resi=kw["quant_resi"], share_quant_resi=kw["share_quant_resi"],
                             default_qresi_counts=kw["default_qresi_counts"], using_znorm=kw["using_znorm"]).eval()
    q.load_state_dict({k[len("quantize."):]: v for k, v in sd.items() if k.startswith("quantize.")}, strict=True)
    return meta, q, outputs


def test_phi_table_matches_released_ten_scale_model(fixtures_dir):
    keys = json.loads((fixtures_dir / "keys" / "var_vae_ch160v4096z32.json").read_text())
    assert phi_index_table(10, 4) == keys["phi_index_used_at_each_scale"] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_ticks(4).tolist() == keys["phi_ticks"]
    q = MultiScaleResidualVQ(codebook_size=16, dim=4)  # the default schedule is VAR's ten scales
    assert q.phi_table == keys["phi_index_used_at_each_scale"]
    names = {k for k in q.state_dict() if k.startswith("quant_resi")}
    assert names == {f"quant_resi.qresi_ls.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert q.ema_vocab_hit_SV.shape == (10, 16) and q.tokens_per_image == 680


def test_phi_sharing_modes_and_key_names():
    shared = MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2, 4), share_quant_resi=1)
    assert shared.phi_table == [0, 0, 0] and "quant_resi.qresi.weight" in shared.state_dict()
    per_scale = MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2, 4), share_quant_resi=0)
    assert per_scale.phi_table == [0, 1, 2] and "quant_resi.2.weight" in per_scale.state_dict()
    none = MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2, 4), quant_resi=0.0)
    assert not any(k.startswith("quant_resi") for k in none.state_dict())


def test_var_fixture_scales_fhat_decode_teacher_forcing_and_loss(fixtures_dir):
    meta, q, out = load_var_fixture(fixtures_dir)
    tol = meta["tolerances"]["suggested"]
    f = out["f"]
    idx = q.encode_scales(f)
    for k, (got, want) in enumerate(zip(idx, out["idx_Bl"])):
        assert torch.equal(got, want), f"first differing scale: {k}"
    for k, (got, want) in enumerate(zip(q.f_hat_per_scale(f), out["f_hat_per_scale"])):
        t = tol[f"f_hat_per_scale[{k}]"]
        torch.testing.assert_close(got, want, atol=t["atol"], rtol=t["rtol"])
    t = tol["decoder_input_f_hat"]
    torch.testing.assert_close(q.decode_scales(out["idx_Bl"]), out["decoder_input_f_hat"], atol=t["atol"], rtol=t["rtol"])
    flat = torch.cat(out["idx_Bl"], 1)
    torch.testing.assert_close(q.indices_to_codes(flat), out["decoder_input_f_hat"], atol=t["atol"], rtol=t["rtol"])
    t = tol["var_teacher_forcing_input"]
    torch.testing.assert_close(q.teacher_forcing_input(out["idx_Bl"]), out["var_teacher_forcing_input"],
                               atol=t["atol"], rtol=t["rtol"])
    z_q, indices, aux = q(f)
    assert torch.equal(indices, flat)
    t = tol["forward_vq_loss"]
    torch.testing.assert_close(aux["loss"], torch.tensor(float(out["forward_vq_loss"])), atol=t["atol"], rtol=t["rtol"])
    torch.testing.assert_close(z_q, out["f_hat_per_scale"][-1], atol=2e-5, rtol=1e-5)


def test_prefix_decode_equals_cumulative_f_hat():
    q = MultiScaleResidualVQ(codebook_size=32, dim=4, patch_nums=(1, 2, (3, 3), 5))
    z = torch.randn(2, 4, 5, 5)
    idx = q.encode_scales(z)
    assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 9), (2, 25)]
    f_hats = q.f_hat_per_scale(z)
    for upto in range(1, 5):
        torch.testing.assert_close(q.decode_scales(idx, upto=upto), f_hats[upto - 1], atol=1e-6, rtol=1e-5)
        flat_prefix = torch.cat(idx[:upto], 1)
        torch.testing.assert_close(q.indices_to_codes(flat_prefix), f_hats[upto - 1], atol=1e-6, rtol=1e-5)
    flat = torch.cat(idx, 1)
    assert [s.tolist() for s in q.split_scales(flat)] == [i.tolist() for i in idx]
    with pytest.raises(UserError, match="tokens one of"):
        q.split_scales(flat[:, :7])


def test_residual_loop_by_hand_for_two_scales():
    q = MultiScaleResidualVQ(codebook_size=16, dim=3, patch_nums=(1, 2), quant_resi=0.0)  # Phi = identity
    z = torch.randn(1, 3, 2, 2)
    idx0, idx1 = q.encode_scales(z)
    E = q.embedding.weight.detach()
    coarse = z.mean((2, 3)).view(1, 3)  # area downsampling to 1x1 = mean
    assert idx0.item() == torch.cdist(coarse, E).argmin().item()
    r0 = E[idx0.item()].view(1, 3, 1, 1).expand(1, 3, 2, 2)  # bicubic upsampling of a constant map is constant
    rest = (z - r0).permute(0, 2, 3, 1).reshape(4, 3)
    assert idx1.flatten().tolist() == torch.cdist(rest, E).argmin(1).tolist()


def test_loss_is_var_cumulative_form_and_gradients_flow():
    q = MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(1, 2, 4), beta=0.25).train()
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    z_q, indices, aux = q(z)
    assert indices.shape == (2, 1 + 4 + 16) and indices.dtype == torch.int64
    f_hats = q.f_hat_per_scale(z)
    want = sum(1.25 * F.mse_loss(fh, z.detach()) for fh in f_hats) / 3
    torch.testing.assert_close(aux["loss"], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z_q, f_hats[-1], atol=1e-6, rtol=1e-5)
    (z_q * 3).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))  # straight-through
    z.grad = None
    aux["loss"].backward()
    assert z.grad.abs().sum() > 0
    assert q.embedding.weight.grad.abs().sum() > 0
    used = {id(q.phi(k)) for k in range(3)}  # 3 scales use 3 of the 4 shared convs
    for conv in q.quant_resi.qresi_ls:
        assert (conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0) == (id(conv) in used)


def test_usage_buffer_ema_follows_var_schedule():
    q = MultiScaleResidualVQ(codebook_size=8, dim=2, patch_nums=(1, 2)).train()
    z = torch.randn(3, 2, 2, 2)
    _, idx, aux = q(z)
    assert torch.equal(q.ema_vocab_hit_SV, torch.zeros(2, 8))  # the forward only records
    q.update_codebook()
    # only the very first scale of the first call is copied; the rest blend into zeros with 0.9
    hits0 = torch.bincount(idx[:, :1].flatten(), minlength=8).float()
    hits1 = torch.bincount(idx[:, 1:].flatten(), minlength=8).float()
    torch.testing.assert_close(q.ema_vocab_hit_SV[0], hits0)
    torch.testing.assert_close(q.ema_vocab_hit_SV[1], 0.1 * hits1)
    assert aux["usage_per_scale"].shape == (2,) and 0 < aux["usage"] <= 1
    q.eval()
    before = q.ema_vocab_hit_SV.clone()
    q(z)
    q.update_codebook()
    assert torch.equal(before, q.ema_vocab_hit_SV)


def test_autocast_bf16_keeps_fp32_indices():
    q = MultiScaleResidualVQ(codebook_size=64, dim=8, patch_nums=(1, 2, 3, 4))
    z = torch.randn(2, 8, 4, 4)
    ref = q.encode_scales(z)
    _, flat_ref, _ = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q.encode_scales(z)
        z_q, flat, aux = q(z)
    assert all(torch.equal(a, b) for a, b in zip(ref, got)) and torch.equal(flat, flat_ref)
    assert z_q.dtype == torch.float32 and aux["loss"].dtype == torch.float32


def test_bad_inputs_are_user_errors():
    q = MultiScaleResidualVQ(codebook_size=8, dim=2, patch_nums=(1, 2))
    with pytest.raises(UserError, match="2x2 latent"):
        q(torch.randn(1, 2, 4, 4))
    with pytest.raises(UserError, match="outside the codebook"):
        q.indices_to_codes(torch.tensor([[0, 1, 2, 3, 8]]))
    with pytest.raises(UserError, match="scale 1 needs"):
        q.decode_scales([torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)])


def test_config_from_yaml_dict_accepts_int_and_pair_patch_nums():
    cfg = from_dict(MultiScaleVQConfig, {"codebook_size": 8, "dim": 2, "patch_nums": [1, [2, 3]]})
    assert MultiScaleResidualVQ(cfg).scales == [(1, 1), (2, 3)]
