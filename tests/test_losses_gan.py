import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqtok.losses.gan import (
    LeCam, adaptive_weight, disc_factor, reconstruction_grads, hinge_d_loss, hinge_g_loss, non_saturating_d_loss, non_saturating_g_loss,
    r1_penalty,
)


def test_hinge_losses_match_formula():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 3.0])
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 4.0) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    assert hinge_g_loss(fake).item() == pytest.approx(-1.0 / 3)


def test_non_saturating_losses_use_logits_first():
    real = torch.tensor([1.5, -0.3]).requires_grad_()
    fake = torch.tensor([0.7, -2.0]).requires_grad_()
    d = non_saturating_d_loss(real, fake)
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert d.item() == pytest.approx(expected.item())
    d.backward()
    # With LlamaGen's swapped BCE arguments the fake term has zero gradient; here it must not.
    assert fake.grad.abs().min() > 0
    assert torch.all(fake.grad > 0) and torch.all(real.grad < 0)
    g = non_saturating_g_loss(torch.tensor([0.0, 2.0]))
    assert g.item() == pytest.approx(F.softplus(-torch.tensor([0.0, 2.0])).mean().item())


def test_non_saturating_g_averages_patch_logits_per_image_first():
    patches = torch.tensor([[[[4.0, -4.0]]], [[[1.0, 1.0]]]])  # (2,1,1,2)
    got = non_saturating_g_loss(patches, per_image_mean=True)
    assert got.item() == pytest.approx(F.softplus(-torch.tensor([0.0, 1.0])).mean().item())


def test_adaptive_weight_is_grad_norm_ratio_with_eps_and_clamp():
    layer = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3)
    y = layer(x)
    nll = y.pow(2).mean()
    g = -(3.0 * y).mean()
    gn = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(g, layer.weight, retain_graph=True)[0]
    w = adaptive_weight(gn, gg)
    assert w.item() == pytest.approx((gn.norm() / (gg.norm() + 1e-4)).item(), rel=1e-6)
    assert not w.requires_grad
    # a generator loss with no gradient at W: the ratio explodes and is clamped to 1e4
    assert adaptive_weight(100 * gn, 0 * gg).item() == pytest.approx(1e4)
    assert adaptive_weight(100 * gn, 0 * gg, max_weight=5.0).item() == pytest.approx(5.0)


def test_adaptive_weight_is_fp32_for_low_precision_grads():
    layer = nn.Linear(3, 2, bias=False).to(torch.bfloat16)
    y = layer(torch.randn(4, 3, dtype=torch.bfloat16))
    gn = torch.autograd.grad(y.float().pow(2).mean(), layer.weight)[0]
    gg = torch.autograd.grad(layer(torch.ones(1, 3, dtype=torch.bfloat16)).float().mean(), layer.weight)[0]
    assert gn.dtype == torch.bfloat16
    w = adaptive_weight(gn, gg)
    assert w.dtype == torch.float32 and math.isfinite(w.item())


def test_reconstruction_grads_give_the_last_layer_gradients_of_each_loss():
    torch.manual_seed(3)
    first, last = nn.Linear(5, 4), nn.Linear(4, 6)
    recon = last(torch.tanh(first(torch.randn(3, 5))))
    head = nn.Linear(6, 1)
    nll, g = recon.pow(2).mean(), -head(recon).mean()
    nll_rec, g_rec, nll_w, g_w = reconstruction_grads(nll, g, recon, last.weight)
    torch.testing.assert_close(nll_rec, torch.autograd.grad(nll, recon, retain_graph=True)[0])
    torch.testing.assert_close(g_rec, torch.autograd.grad(g, recon, retain_graph=True)[0])
    torch.testing.assert_close(nll_w, torch.autograd.grad(nll, last.weight, retain_graph=True)[0])
    torch.testing.assert_close(g_w, torch.autograd.grad(g, last.weight, retain_graph=True)[0])
    # the graph below the reconstruction is kept for the tokenizer's backward
    recon.backward(nll_rec)
    assert first.weight.grad is not None
    # a loss that does not depend on the reconstruction contributes zeros
    zero = torch.zeros((), requires_grad=False)
    recon2 = last(torch.randn(2, 4))
    z_rec, _, z_w, _ = reconstruction_grads(zero, recon2.sum(), recon2, last.weight)
    assert not z_rec.any() and not z_w.any()


def test_disc_factor_start_and_warmup():
    assert disc_factor(9, 10) == 0.0
    assert disc_factor(10, 10) == 1.0
    assert disc_factor(10, 10, warmup=4) == pytest.approx(0.25)
    assert disc_factor(13, 10, warmup=4) == 1.0
    assert disc_factor(100, 10, warmup=4) == 1.0


def test_lecam_value_and_ema_update():
    lecam = LeCam(decay=0.9)
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, 1.0])
    reg = lecam(real, fake)  # EMAs start at 0: relu(real - 0)^2 mean + relu(0 - fake)^2 mean
    assert reg.item() == pytest.approx((1 + 9) / 2 + (1 + 0) / 2)
    assert lecam.ema_real.item() == pytest.approx(0.1 * 2.0)
    assert lecam.ema_fake.item() == pytest.approx(0.1 * 0.0)
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.2 + 0.1 * 2.0)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}


def test_r1_penalty_of_a_linear_discriminator():
    d = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    real = torch.randn(5, 3, 2, 2)
    expected = d[1].weight.pow(2).sum()
    got = r1_penalty(d, real)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()  # double backward reaches D's weights
    assert d[1].weight.grad is not None and d[1].weight.grad.abs().sum() > 0


def test_r1_of_a_patch_discriminator_is_normalised_like_its_loss():
    # a 1x1-conv "patch" D: logits (B,1,H,W) = w . x per pixel; per image the D loss averages the H*W logits,
    # so grad_x mean(logits) = w / (H*W) at every pixel and ||grad||^2 = sum(w^2) / (H*W), at every resolution
    d = nn.Conv2d(3, 1, 1, bias=False)
    for size in (4, 8):
        real = torch.randn(3, 3, size, size)
        expected = d.weight.pow(2).sum() / (size * size)
        assert r1_penalty(d, real).item() == pytest.approx(expected.item(), rel=1e-5)


def _tokenizer_loss(**kw):
    from vqtok.losses.discriminators import DiscriminatorConfig
    from vqtok.losses.tokenizer_loss import LossConfig, TokenizerLoss

    cfg = LossConfig(**{"perceptual_weight": 0.0, "disc_weight": 0.5, "adaptive_weight": False,
                        "disc": DiscriminatorConfig(kind="maskgit", channels=32), **kw})
    return TokenizerLoss(cfg, 32)


def test_lecam_and_r1_follow_the_disc_factor_ramp_and_d_loss_weight_scales_the_d_loss():
    from vqtok.losses.gan import LeCam, hinge_d_loss

    torch.manual_seed(0)
    loss = _tokenizer_loss(d_loss_weight=0.5, disc_start=2, disc_warmup=4, lecam_weight=0.1, r1_weight=2.0, r1_every=1)
    images, recon = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    x, xr = images * 2 - 1, recon * 2 - 1
    d = loss.discriminator
    real, fake = d(x).float(), d(xr).float()
    lecam = LeCam(0.999)(real, fake)
    r1 = r1_penalty(d, x)
    step = 3  # factor = (3 - 2 + 1) / 4 = 0.5
    got, metrics = loss.discriminator_loss(images, recon, step)
    expected = 0.5 * (0.5 * hinge_d_loss(real, fake) + 0.1 * lecam + 0.5 * 2.0 * 1 * r1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["d_loss"].item() == pytest.approx(hinge_d_loss(real, fake).item(), rel=1e-5)


def test_r1_with_a_batchnorm_discriminator_is_refused():
    from vqtok.errors import ConfigError
    from vqtok.losses.discriminators import DiscriminatorConfig

    with pytest.raises(ConfigError, match="BatchNorm"):
        _tokenizer_loss(r1_weight=1.0, disc=DiscriminatorConfig(kind="patchgan", channels=8, layers=2))
    _tokenizer_loss(r1_weight=1.0)  # maskgit D (GroupNorm) is fine
