import pytest
import torch
import torch.nn.functional as F

from vqtok.tokenizer import small_map_conv
from vqtok.tokenizer.blocks import conv3x3
from vqtok.tokenizer.small_map_conv import Conv3x3, gemm_weight_grad, takes_gemm_weight_grad


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_conv_gradients_equal_torchs(bias, channels_last):
    torch.manual_seed(0)
    conv = conv3x3(512, 512, bias=bias)
    assert isinstance(conv, Conv3x3) and isinstance(conv, torch.nn.Conv2d)
    x = torch.randn(2, 512, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    upstream = torch.randn(2, 512, 4, 4)
    assert takes_gemm_weight_grad(conv, x)
    y = conv(x)
    assert type(y.grad_fn).__name__.startswith("_SmallMapConv3x3")
    y.backward(upstream)
    got = [x.grad, conv.weight.grad] + ([conv.bias.grad] if bias else [])
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    b_ref = conv.bias.detach().clone().requires_grad_(True) if bias else None
    y_ref = F.conv2d(x_ref, w_ref, b_ref, padding=1)
    torch.testing.assert_close(y.detach(), y_ref.detach())
    y_ref.backward(upstream)
    want = [x_ref.grad, w_ref.grad] + ([b_ref.grad] if bias else [])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_frozen_weight_or_input_without_grad():
    torch.manual_seed(1)
    conv = conv3x3(512, 512)
    conv.weight.requires_grad_(False)
    x = torch.randn(1, 512, 2, 2, requires_grad=True)
    assert not takes_gemm_weight_grad(conv, x)  # nothing to gain: torch's own path
    conv.weight.requires_grad_(True)
    x = torch.randn(1, 512, 2, 2)  # an input that needs no gradient (the first layer's images)
    conv(x).sum().backward()
    ref = torch.nn.grad.conv2d_weight(x, conv.weight.shape, torch.ones(1, 512, 2, 2), padding=1)
    torch.testing.assert_close(conv.weight.grad, ref, rtol=1e-4, atol=1e-4)


def test_the_gemm_form_is_taken_only_where_it_was_measured_faster():
    wide, narrow = conv3x3(512, 512), conv3x3(256, 256)
    strided = conv3x3(512, 512, stride=2, padding=0)
    small = torch.randn(4, 512, 4, 4)
    assert takes_gemm_weight_grad(wide, small)
    assert not takes_gemm_weight_grad(wide, torch.randn(4, 512, 8, 8))  # 256 output pixels: oneDNN is faster
    assert not takes_gemm_weight_grad(narrow, torch.randn(4, 256, 4, 4))
    assert not takes_gemm_weight_grad(strided, small)
    assert not takes_gemm_weight_grad(wide, small.double())
    with torch.no_grad():
        assert not takes_gemm_weight_grad(wide, small)
        assert wide(small).grad_fn is None
    assert small_map_conv.MAX_PIXELS >= 4 * 4 * 4


def test_bf16_autocast_takes_the_plain_conv_and_trains():
    wide = conv3x3(512, 512)
    x = torch.randn(4, 512, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_gemm_weight_grad(wide, x)
        y = wide(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert wide.weight.grad is not None and x.grad is not None


def test_gemm_weight_grad_matches_the_definition():
    torch.manual_seed(2)
    x, g = torch.randn(3, 5, 3, 4, dtype=torch.float64), torch.randn(3, 7, 3, 4, dtype=torch.float64)
    got = gemm_weight_grad(g, x, torch.Size((7, 5, 3, 3)))
    xp = F.pad(x, (1, 1, 1, 1))
    want = torch.zeros(7, 5, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            want[:, :, i, j] = torch.einsum("bohw,bchw->oc", g, xp[:, :, i:i + 3, j:j + 4])
    torch.testing.assert_close(got, want)
