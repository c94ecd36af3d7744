"""The loss terms no other test exercised inside the tokenizer loss and a training run — LPIPS with a
real (test-written) VGG16 file and its weight in the total, the adaptive GAN weight against a hand computation
on a tiny decoder, and R1 inside a short training run."""

import pytest
import torch
import torchvision
from torch import nn

from vqtok.losses import lpips as vl
from vqtok.losses.discriminators import DiscriminatorConfig
from vqtok.losses.tokenizer_loss import LossConfig, TokenizerLoss
from vqtok.train.tokenizer_task import train_tokenizer

from test_train_tokenizer import FAST, make_photos, rows


@pytest.fixture
def hub_with_vgg16(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    features = torchvision.models.vgg16(weights=None).features
    path = vl.hub_vgg16_path()
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_lpips_term_and_its_weight_in_the_total(hub_with_vgg16):
    torch.manual_seed(0)
    x, r = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    aux = {"loss": torch.tensor(0.3)}
    losses = {}
    for w in (0.0, 1.0, 2.5):
        cfg = LossConfig(perceptual_weight=w, disc_weight=0.0, l1_weight=1.0, quantizer_weight=1.0)
        fn = TokenizerLoss(cfg, 32)
        assert (fn.lpips is not None) == (w > 0) and (w == 0 or not fn.uses_random_lpips)
        total, m, _ = fn.generator_loss(x, r, aux, 0, None)
        losses[w] = (float(total), m)
    lp = vl.LPIPS(str(hub_with_vgg16))(x * 2 - 1, r * 2 - 1).mean()  # the file from the hub cache, [-1, 1] inputs
    torch.testing.assert_close(losses[1.0][1]["lpips"], lp)
    l1 = float((x - r).abs().mean() * 2)
    assert losses[0.0][0] == pytest.approx(l1 + 0.3, rel=1e-5)
    assert losses[1.0][0] == pytest.approx(l1 + float(lp) + 0.3, rel=1e-5)
    assert losses[2.5][0] == pytest.approx(l1 + 2.5 * float(lp) + 0.3, rel=1e-5)


class _TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(2, 3, 1)

    def forward(self, z):
        return torch.sigmoid(self.conv_out(z))


def test_adaptive_weight_matches_a_hand_computation_on_a_tiny_decoder():
    torch.manual_seed(0)
    dec = _TinyDecoder()
    z = torch.randn(2, 2, 32, 32)
    x = torch.rand(2, 3, 32, 32)
    cfg = LossConfig(perceptual_weight=0.0, l1_weight=1.0, disc_weight=0.7, adaptive_weight=True, disc_start=0,
                     g_loss="hinge", disc=DiscriminatorConfig(kind="patchgan", channels=8))
    fn = TokenizerLoss(cfg, 32)
    recon = dec(z)
    total, m, _ = fn.generator_loss(x, recon, {"loss": torch.tensor(0.0)}, 5, dec.conv_out.weight)
    # by hand: w = 0.7 * |d nll / dW| / (|d g / dW| + 1e-4), nll = L1 on [-1, 1], g = -mean D(x̂)
    recon2 = dec(z)
    nll = ((x * 2 - 1) - (recon2 * 2 - 1)).abs().mean()
    g = -fn.discriminator(recon2 * 2 - 1).mean()
    gn = torch.autograd.grad(nll, dec.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv_out.weight, retain_graph=True)[0].norm()
    w = 0.7 * gn / (gg + 1e-4)
    torch.testing.assert_close(m["adv_weight"], w.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, (nll + w * g).detach(), rtol=1e-5, atol=1e-6)
    # the weight is a constant for the backward: the decoder gets d(nll)/dW + w * d(g)/dW
    dec.zero_grad()
    total.backward()
    expected = torch.autograd.grad(nll + w.detach() * g, dec.conv_out.weight)[0]
    torch.testing.assert_close(dec.conv_out.weight.grad, expected, rtol=1e-4, atol=1e-7)


def test_r1_runs_inside_a_short_training_run(tmp_path):
    photos = make_photos(tmp_path / "photos")
    over = FAST + ["train.steps=4", "loss.r1_weight=2.0", "loss.r1_every=2", "loss.disc_start=0"]
    train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over)
    r = rows(tmp_path / "run")
    # lazy R1: computed on steps 0 and 2 (logged at rows 1 and 3), never on the others
    assert [("r1" in x) for x in r] == [True, False, True, False]
    assert all(x["r1"] > 0 for x in r if "r1" in x)
    # and it is in D's total: d_total = d_loss + gamma / 2 * every * r1 (no LeCam in tiny-vqgan)
    for x in r:
        if "r1" in x:
            assert x["d_total"] == pytest.approx(x["d_loss"] + 0.5 * 2.0 * 2 * x["r1"], rel=1e-4)
