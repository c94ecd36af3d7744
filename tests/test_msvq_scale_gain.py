"""The multi-scale quantizer's per-scale search gain (`scale_gain`): each scale's residual is searched in
the codebook's own magnitude (r_k / g_k, g_k = running residual RMS / codebook RMS) and adds g_k * e.
Covers its effect on per-scale usage from a skewed start, the search / decode / gradient algebra, the
restarts and k-means in the gained space, state-dict resume and agreement of two gloo ranks."""

import pytest
import torch
import torch.nn.functional as F

from gloo_ranks import run_on_gloo_ranks
from quantizer_resume import trained_then_resumed
from vqtok.errors import ConfigError
from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ
from vqtok.tokenizer.quantizers.vq import nearest_code

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_middle_latents(seed: int, n: int = 64) -> torch.Tensor:
    """(n, 4, 4, 4) latents built like the images' ones: a 2x2 layout of 16 far-apart vectors (norm ~8) and a
    small 4x4 detail (norm ~0.4), so the fine scale's residual is far smaller than the coarse one's."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(16, 4, generator=torch.Generator().manual_seed(99)) * 4.0
    coarse = centers[torch.randint(0, 16, (n, 2, 2), generator=g)].permute(0, 3, 1, 2)
    return F.interpolate(coarse, size=(4, 4), mode="nearest") + 0.2 * torch.randn(n, 4, 4, 4, generator=g)


def _train(steps: int = 40, **kw) -> MultiScaleResidualVQ:
    torch.manual_seed(0)
    q = MultiScaleResidualVQ(codebook_size=32, dim=4, patch_nums=(2, 4), quant_resi=0.0, kmeans_init=True, **kw).train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for step in range(steps):
        _, _, aux = q(_small_middle_latents(step))
        opt.zero_grad()
        aux["loss"].backward()
        opt.step()
        q.update_codebook(step)
    return q.eval()


@torch.no_grad()
def _held_out(q: MultiScaleResidualVQ) -> tuple[list[float], float]:
    """Per-scale usage on held-out latents (1024 tokens at 2x2, 4096 at 4x4 for 32 codes) and the
    quantization error of the full sum."""
    z = _small_middle_latents(1000, 256)
    usage = [s.unique().numel() / q.codebook_size for s in q.encode_scales(z)]
    err = float(F.mse_loss(q.f_hat_per_scale(z)[-1], z))
    return usage, err


def test_scale_gain_lets_the_small_residual_scale_use_the_whole_codebook_without_losing_reconstruction():
    plain_usage, plain_err = _held_out(_train())
    gained = _train(scale_gain=True)
    usage, err = _held_out(gained)
    # measured: squared L2 [0.88, 0.56] with error 2.7, with the gain [0.78, 1.0] with error 0.89 (the
    # coarse scale holds only 16 distinct vectors, so its usage shows little); the error falls because
    # every code now also serves the fine scale at the fine scale's magnitude
    assert plain_usage[1] <= 0.7, plain_usage
    assert usage[1] >= 0.95 and usage[0] >= 0.7, usage
    assert err < 0.5 * plain_err, (err, plain_err)
    # the fine scale's gain is its residual's RMS over the codebook's: well below the coarse scale's
    g = gained.gains()
    code_rms = gained.embedding.weight.square().mean().sqrt()
    torch.testing.assert_close(g, gained.scale_rms / code_rms)
    assert float(g[1, 0]) < 0.5 * float(g[0, 0])
    assert torch.equal(g, g[:, :1].expand_as(g))  # one gain for all channels without scale_center


def test_gained_search_decode_and_gradients():
    torch.manual_seed(0)
    q = MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(1, 2, 4), quant_resi=0.0, scale_gain=True).train()
    with torch.no_grad():
        q.embedding.weight.normal_()
        q.scale_rms.copy_(torch.tensor([2.0, 0.5, 0.1])[:, None].expand(3, 4))
    g = q.gains()
    code_rms = q.embedding.weight.detach().square().mean().sqrt()
    torch.testing.assert_close(g, torch.tensor([2.0, 0.5, 0.1])[:, None].expand(3, 4) / code_rms)
    z = torch.randn(3, 4, 4, 4).requires_grad_(True)
    z_q, idx, aux = q(z)
    # by hand: nearest code to r_k / g_k, residual g_k * E[idx] upsampled
    E = q.embedding.weight.detach()
    f_rest, f_hat, parts = z.detach().clone(), torch.zeros_like(z), []
    for k, (h, w) in enumerate(q.scales):
        r = f_rest if k == 2 else F.interpolate(f_rest, size=(h, w), mode="area")
        i = nearest_code(r.permute(0, 2, 3, 1).reshape(-1, 4) / g[k, 0], E).view(3, h, w)
        add = (g[k, 0] * E[i]).permute(0, 3, 1, 2)
        if k != 2:
            add = F.interpolate(add, size=(4, 4), mode="bicubic", align_corners=False)
        f_hat, f_rest = f_hat + add, f_rest - add
        parts.append(i.reshape(3, -1))
    assert torch.equal(idx, torch.cat(parts, 1))
    torch.testing.assert_close(z_q.detach(), f_hat, atol=1e-6, rtol=1e-5)
    # decoding the indices gives the same latent (the gains are part of the model, not of the batch)
    q.eval()
    torch.testing.assert_close(q.indices_to_codes(idx), f_hat, atol=1e-6, rtol=1e-5)
    # straight-through: z's gradient of sum(z_q) is ones; the codebook's gradient carries the gain
    q.train()
    q.embedding.weight.grad = None
    z_q, idx, aux = q(z)
    (z_q.sum() + aux["loss"]).backward()
    assert torch.isfinite(q.embedding.weight.grad).all()
    one = MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(4,), quant_resi=0.0, scale_gain=True).train()
    with torch.no_grad():
        one.embedding.weight.copy_(E)
        one.scale_rms.fill_(0.3)
    x = torch.randn(2, 4, 4, 4)
    _, i, aux = one(x)
    aux["loss"].backward()
    gk = float(one.gains()[0, 0])
    rows = x.permute(0, 2, 3, 1).reshape(-1, 4)
    # d/dE of mse(g E[i], x) (the codebook term; beta's term has no codebook gradient)
    want = torch.zeros_like(E).index_add_(0, i.reshape(-1), 2 * gk * (gk * E[i.reshape(-1)] - rows) / rows.numel())
    torch.testing.assert_close(one.embedding.weight.grad, want, atol=1e-6, rtol=1e-5)


def test_restarts_and_kmeans_live_in_the_gained_space():
    torch.manual_seed(0)
    q = MultiScaleResidualVQ(codebook_size=30, dim=4, patch_nums=(1, 2, 4), quant_resi=0.0, kmeans_init=True,
                             dead_code_threshold=100.0, scale_gain=True).train()
    z = _small_middle_latents(0, 16)
    q(z)
    q.update_codebook(0)  # k-means on each scale's rows brought to one RMS
    assert bool(q.initialized) and float(q.scale_rms.abs().sum()) == 0  # measured afresh after the init
    q(z)
    code_rms = q.embedding.weight.detach().square().mean().sqrt()
    q.update_codebook(1)  # the first measurement is copied; every code is below threshold 100 and restarts
    g = q.scale_rms / code_rms  # the gains the restart divided by (this step's RMS, the codebook before it)
    codes = q.embedding.weight.detach()
    # code i restarts from a residual of scale i mod 3, divided by that scale's gain; the 1x1 residual is the
    # first thing the forward quantizes, the latent's mean
    coarse = F.interpolate(z, size=(1, 1), mode="area").flatten(1)
    for i in range(0, 30, 3):
        assert any(torch.allclose(codes[i] * g[0, 0], c, atol=1e-5) for c in coarse), i
    # restarted codes keep the codebook's magnitude, so the gains hardly move
    torch.testing.assert_close(q.gains(), g, rtol=0.3, atol=0)
    # the EMA blends from the second measurement on
    before = q.scale_rms.clone()
    q(z * 2)
    q.update_codebook(2)
    assert not torch.allclose(q.scale_rms, before)
    assert bool((q.scale_rms > before).all())


def test_scale_gain_state_resumes_exactly_and_defaults_leave_vars_keys_alone():
    assert "scale_rms" not in MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2)).state_dict()
    with pytest.raises(ConfigError, match="scale_gain_decay"):
        MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2), scale_gain=True, scale_gain_decay=1.0)

    def make():
        return MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(2, 4), quant_resi=0.0, kmeans_init=True,
                                    dead_code_threshold=0.5, scale_gain=True).train()

    def steps(q, opt, start, n):
        for s in range(start, start + n):
            _, _, aux = q(_small_middle_latents(s, 16))
            opt.zero_grad()
            aux["loss"].backward()
            opt.step()
            q.update_codebook(s)

    a, opt_a, b, opt_b = trained_then_resumed(make, steps)
    torch.testing.assert_close(b.gains(), a.gains(), rtol=0, atol=0)
    steps(a, opt_a, 5, 5)
    steps(b, opt_b, 5, 5)
    torch.testing.assert_close(b.scale_rms, a.scale_rms, rtol=0, atol=0)
    torch.testing.assert_close(b.embedding.weight, a.embedding.weight, rtol=0, atol=0)


_CARE = [dict(kmeans_init=False, dead_code_threshold=0.0),
         dict(kmeans_init=False, dead_code_threshold=0.0, scale_center=True),
         dict(kmeans_init=True, dead_code_threshold=3.0, scale_center=True)]


def _codebook_care(z_steps, **kw):
    """Gain measurements (and k-means init and restarts) over a few steps; no optimizer: only the collectives."""
    torch.manual_seed(0)
    q = MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(1, 2, 4), quant_resi=0.0, scale_gain=True, **kw).train()
    for s, z in enumerate(z_steps):
        q(z)
        q.update_codebook(s)
    return q.scale_rms.clone(), q.offsets().clone(), q.embedding.weight.detach().clone()



def _every_care(z_steps):  # one rank's results for every setting in _CARE
    return [_codebook_care(z_steps, **kw) for kw in _CARE]

def test_two_gloo_ranks_measure_the_gains_of_the_whole_batch_and_agree(tmp_path):
    steps = [_small_middle_latents(s, 8) * (1 + s) for s in range(4)]
    halves = [[z[:4] for z in steps], [z[4:] for z in steps]]
    out = run_on_gloo_ranks(_every_care, halves, tmp_path)
    # without k-means and restarts (whose pooled rows come in rank order, not batch order) the two ranks
    # measure the residual RMS of the whole global batch, as one process over both halves does
    for i in (0, 1):  # one gain per scale; per-channel means and RMS (scale_center)
        rms_single, mean_single, _ = _codebook_care(steps, **_CARE[i])
        for rank in range(2):
            rms, mean, codes = out[rank][i]
            torch.testing.assert_close(rms, rms_single, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(mean, mean_single, rtol=1e-5, atol=1e-7)
    assert not torch.equal(out[0][1][1], torch.zeros_like(out[0][1][1]))
    # with k-means and restarts every rank ends with the same statistics and codebook
    (rms0, mean0, codes0), (rms1, mean1, codes1) = out[0][2], out[1][2]
    assert torch.equal(rms0, rms1) and torch.equal(mean0, mean1) and torch.equal(codes0, codes1)
    assert bool((rms0 > 0).all())


def test_scale_center_lets_an_offset_scale_reach_the_whole_codebook_and_decodes_with_its_offset():
    def usage_on_offset_residuals(**kw):
        torch.manual_seed(0)
        q = MultiScaleResidualVQ(codebook_size=32, dim=4, patch_nums=(4,), quant_resi=0.0, scale_gain=True, **kw).train()
        with torch.no_grad():
            q.embedding.weight.normal_()  # a codebook centred on the origin (as one shared with other scales is)
        z = 2.0 + 0.5 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(1))
        for step in range(3):  # measure the scale's statistics; no optimizer, the codebook stays as it is
            q(z)
            q.update_codebook(step)
        q.eval()
        with torch.no_grad():
            z_q, idx, _ = q(z)
            torch.testing.assert_close(q.indices_to_codes(idx), z_q, atol=1e-6, rtol=1e-5)
        return idx.unique().numel() / 32, q

    # one gain only rescales: the offset residuals stay on one side of the codebook
    plain, _ = usage_on_offset_residuals()
    centred, q = usage_on_offset_residuals(scale_center=True)
    assert plain <= 0.5 and centred >= 0.9, (plain, centred)
    torch.testing.assert_close(q.offsets()[0], torch.full((4,), 2.0), atol=0.05, rtol=0)
    torch.testing.assert_close(q.gains()[0] * q.embedding.weight.square().mean().sqrt(), torch.full((4,), 0.5),
                               atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match="scale_center needs scale_gain"):
        MultiScaleResidualVQ(codebook_size=8, dim=4, patch_nums=(1, 2), scale_center=True)


def test_scale_center_trains_and_resumes():
    _, plain_err = _held_out(_train())
    q = _train(scale_gain=True, scale_center=True)
    usage, err = _held_out(q)
    assert usage[1] >= 0.95 and err < 0.5 * plain_err, (usage, err, plain_err)
    b = MultiScaleResidualVQ(codebook_size=32, dim=4, patch_nums=(2, 4), quant_resi=0.0, kmeans_init=True,
                             scale_gain=True, scale_center=True)
    b.load_state_dict(q.state_dict(), strict=True)
    b.eval()
    z = _small_middle_latents(7, 4)
    assert torch.equal(b(z).indices, q(z).indices)


def test_init_from_weights_without_the_gain_statistics_starts_them_fresh_and_the_reverse_is_refused():
    import dataclasses

    from vqtok.errors import UserError
    from vqtok.tokenizer.presets import tiny_msvq
    from vqtok.tokenizer.tokenizer import build_tokenizer
    from vqtok.train.tokenizer_init import InitSource, load_into_tokenizer

    plain_cfg = tiny_msvq()
    q = plain_cfg.quantizer
    gained_cfg = dataclasses.replace(plain_cfg, quantizer=dataclasses.replace(
        q, params={**q.params, "scale_gain": True, "scale_center": True}))
    plain, gained = build_tokenizer(plain_cfg), build_tokenizer(gained_cfg)
    notes = load_into_tokenizer(gained, InitSource("plain", plain.state_dict()), "plain")
    assert notes == ["started fresh: scale_mean, scale_rms"]
    torch.testing.assert_close(gained.quantize.embedding.weight, plain.quantize.embedding.weight, rtol=0, atol=0)
    with pytest.raises(UserError, match="scale_rms, which this model lacks"):
        load_into_tokenizer(build_tokenizer(plain_cfg), InitSource("gained", gained.state_dict()), "gained")
