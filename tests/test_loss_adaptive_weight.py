"""The adaptive GAN weight's one-pass backward (LPIPS and D back-propagated once each) against the
straightforward formulation: autograd.grad of nll and of G at the last layer, then the full backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqtok.losses.discriminators import DiscriminatorConfig
from vqtok.losses.tokenizer_loss import LossConfig, TokenizerLoss


class _TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        z = self.enc(x)
        recon = torch.sigmoid(self.conv_out(F.silu(self.mid(z))))
        return recon, {"loss": z.pow(2).mean()}  # a quantizer-like term that reaches the encoder only


@pytest.mark.parametrize("step,perceptual", [(1, 1.0), (7, 0.0)])
def test_one_pass_adaptive_backward_equals_the_double_backward(step, perceptual):
    torch.manual_seed(0)
    model = _TinyAutoencoder()
    cfg = LossConfig(l1_weight=1.0, l2_weight=0.5, perceptual_weight=perceptual, lpips_weights="random-for-tests",
                     quantizer_weight=0.25, disc_weight=0.8, adaptive_weight=True, disc_start=0, disc_warmup=4,
                     g_loss="hinge", disc=DiscriminatorConfig(kind="patchgan", channels=8, layers=2))
    fn = TokenizerLoss(cfg, 32)
    x = torch.rand(2, 3, 32, 32)
    params = list(model.parameters())

    recon, aux = model(x)
    total, m, _ = fn.generator_loss(x, recon, aux, step, model.conv_out.weight)
    got = torch.autograd.grad(total, params)

    # straightforward: w from autograd.grad at the last layer, then one backward of the whole loss
    recon, aux = model(x)
    xs, xr = x * 2 - 1, recon * 2 - 1
    nll = (xs - xr).abs().mean() + 0.5 * F.mse_loss(xr, xs)
    if perceptual:
        nll = nll + fn.lpips(xs, xr).mean()
    fn.discriminator.requires_grad_(False)
    g = -fn.discriminator(xr).mean()
    fn.discriminator.requires_grad_(True)
    gn = torch.autograd.grad(nll, model.conv_out.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(g, model.conv_out.weight, retain_graph=True)[0]
    w = (0.8 * gn.norm() / (gg.norm() + 1e-4)).detach()
    factor = min(1.0, (step + 1) / 4)
    reference = nll + 0.25 * aux["loss"] + factor * w * g
    want = torch.autograd.grad(reference, params)

    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the reported values are the true ones
    torch.testing.assert_close(total.detach(), reference.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["loss"], reference.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["adv_weight"], w * factor, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(m["g_adv"], g.detach())
    assert all(not v.requires_grad for v in m.values())
    # G's loss trained neither D nor LPIPS
    assert all(p.grad is None for p in fn.discriminator.parameters())
    assert all(p.grad is None and not p.requires_grad for p in (fn.lpips.parameters() if fn.lpips else []))


def test_without_the_adaptive_weight_the_loss_is_the_plain_sum():
    torch.manual_seed(1)
    model = _TinyAutoencoder()
    cfg = LossConfig(l1_weight=1.0, perceptual_weight=0.0, disc_weight=0.5, adaptive_weight=False, disc_start=0,
                     disc=DiscriminatorConfig(kind="patchgan", channels=8, layers=2))
    fn = TokenizerLoss(cfg, 32)
    x = torch.rand(2, 3, 32, 32)
    recon, aux = model(x)
    total, m, _ = fn.generator_loss(x, recon, aux, 0, model.conv_out.weight)
    assert m["loss"] is total and total.grad_fn is not None
    expected = (x * 2 - 1 - (recon * 2 - 1)).abs().mean() + aux["loss"] + 0.5 * m["g_adv"]
    torch.testing.assert_close(total, expected)


def test_a_frozen_decoder_with_the_adaptive_weight_is_a_config_error(tmp_path):
    from test_train_tokenizer import FAST, make_photos
    from vqtok.errors import ConfigError
    from vqtok.train.tokenizer_task import train_tokenizer

    photos = make_photos(tmp_path / "photos")
    over = FAST + ["train.steps=1", "loss.disc_start=0", "train.freeze=decoder"]
    with pytest.raises(ConfigError, match="loss.adaptive_weight=false"):
        train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over)
    assert not (tmp_path / "run").exists()
    result = train_tokenizer(photos, "tiny-vqgan", tmp_path / "fixed", over + ["loss.adaptive_weight=false"])
    assert result.step == 1
