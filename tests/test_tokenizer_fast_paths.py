"""The autoencoder's speed paths compute what the plain forms compute.

Covered: the phase form of nearest-x2 + 3x3 conv (`upsample2x_conv3x3`), in-place SiLU / residual adds
without autograd (inputs left untouched), and the channels-last layout the CPU networks switch to for
large batches (outputs back in the ordinary layout, gradients unchanged).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqtok.tokenizer import autoencoder, blocks
from vqtok.tokenizer.autoencoder import Decoder, Encoder
from vqtok.tokenizer.blocks import AttnBlock, ResnetBlock, upsample2x_conv3x3
from vqtok.tokenizer.config import AutoencoderConfig


def _direct(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_phase_form_matches_upsample_then_conv(bias, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1, bias=bias)
    x = torch.randn(2, 16, 12, 20)  # non-square, 480 input pixels: above the phase-form threshold
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = upsample2x_conv3x3(x, conv)
    assert got.shape == (2, 24, 24, 40)
    torch.testing.assert_close(got, _direct(x, conv), atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_upsample_phase_form_gradients_match():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    upstream = torch.randn(1, 8, 32, 32)
    grads = []
    for fn in (upsample2x_conv3x3, _direct):
        conv.zero_grad()
        x.grad = None
        (fn(x, conv) * upstream).sum().backward()
        grads.append((x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_small_upsample_inputs_take_the_direct_form_exactly():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)  # 64 pixels < UPSAMPLE_PHASES_MIN_PIXELS
    assert x.shape[0] * 64 < blocks.UPSAMPLE_PHASES_MIN_PIXELS
    assert torch.equal(upsample2x_conv3x3(x, conv), _direct(x, conv))


@pytest.mark.parametrize("make", [
    lambda: ResnetBlock(32, 32),
    lambda: ResnetBlock(32, 64),
    lambda: ResnetBlock(32, 32, maskgit=True),
    lambda: ResnetBlock(32, 64, maskgit=True),
    lambda: AttnBlock(32, fused=True),
    lambda: AttnBlock(32, fused=False),
])
def test_in_place_inference_matches_autograd_forward_and_keeps_the_input(make):
    torch.manual_seed(0)
    block = make().eval()
    x = torch.randn(2, 32, 8, 8)
    keep = x.clone()
    with_grad = block(x)
    assert with_grad.requires_grad  # the out-of-place path ran
    with torch.no_grad():
        no_grad = block(x)
    with torch.inference_mode():
        inference = block(x)
    assert torch.equal(x, keep)
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(inference, with_grad.detach())


def _tiny_ae(style: str) -> AutoencoderConfig:
    return AutoencoderConfig(style=style, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8,
                             attention=style != "maskgit", mid_attention=style != "maskgit")


@pytest.mark.parametrize("style", ["maskgit", "var", "llamagen"])
def test_channels_last_cpu_path_matches_nchw_and_returns_contiguous(style, monkeypatch):
    torch.manual_seed(0)
    enc, dec = Encoder(_tiny_ae(style)).eval(), Decoder(_tiny_ae(style)).eval()
    x = torch.rand(2, 3, 128, 128)  # 32,768 pixels: the channels-last threshold
    assert x.shape[0] * x.shape[2] * x.shape[3] >= autoencoder.CHANNELS_LAST_MIN_PIXELS
    seen = []  # per conv call: did its input arrive channels-last?
    conv_forward = torch.nn.Conv2d.forward

    def recording_forward(self, t):
        seen.append(t.is_contiguous(memory_format=torch.channels_last))
        return conv_forward(self, t)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)

    def run():
        seen.clear()
        z = enc(x)
        first_enc = seen[0]
        seen.clear()
        img = dec(z)
        return z, img, (first_enc, seen[0])

    with torch.no_grad():
        z, img, first = run()
        assert first == (True, True) and z.is_contiguous() and img.is_contiguous()  # ran NHWC, handed back NCHW
        monkeypatch.setattr(autoencoder, "CHANNELS_LAST_MIN_PIXELS", 10**9)
        z_nchw, img_nchw, first = run()
        assert first == (False, False)
    # Same sums in another order: float32 rounding, which GroupNorm amplifies in a random-init net
    # (~2e-5 of the range here).
    torch.testing.assert_close(z, z_nchw, atol=1e-4 * z_nchw.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(img, img_nchw, atol=1e-4 * img_nchw.abs().max().item(), rtol=1e-4)


def test_channels_last_training_gradients_match_nchw(monkeypatch):
    torch.manual_seed(0)
    enc = Encoder(_tiny_ae("llamagen"))
    x = torch.rand(2, 3, 128, 128)
    grads = []
    for threshold in (autoencoder.CHANNELS_LAST_MIN_PIXELS, 10**9):
        monkeypatch.setattr(autoencoder, "CHANNELS_LAST_MIN_PIXELS", threshold)
        enc.zero_grad()
        enc(x).square().mean().backward()
        grads.append(enc.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("style", ["var", "llamagen"])
def test_below_the_threshold_every_conv_runs_nchw_through_attention(style, monkeypatch):
    """The layout is the autoencoder's decision: attention must not hand a channels-last view onwards (with
    more than one thread the 1x1 convs run through oneDNN and keep it, so every later conv and norm would run
    channels-last and each conv re-lay its weight), and a channels-last latent is decoded in NCHW too."""
    torch.manual_seed(0)
    enc, dec = Encoder(_tiny_ae(style)), Decoder(_tiny_ae(style))
    x = torch.rand(2, 3, 32, 32)
    assert x.shape[0] * x.shape[2] * x.shape[3] < autoencoder.CHANNELS_LAST_MIN_PIXELS
    seen = []
    conv_forward = torch.nn.Conv2d.forward

    def recording_forward(self, t):
        seen.append(t.is_contiguous() or t.shape[-1] * t.shape[-2] == 1)
        return conv_forward(self, t)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = enc(x)
        latent_cl = z.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # how a quantizer hands it over
        assert not latent_cl.is_contiguous()
        img = dec(latent_cl)
        img.square().mean().backward()
    finally:
        torch.set_num_threads(threads)
    assert len(seen) > 10 and all(seen)
