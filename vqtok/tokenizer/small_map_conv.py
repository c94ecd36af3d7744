"""A 3x3 conv whose weight gradient on small, wide CPU feature maps is one matrix product.

The deepest levels of an f16 autoencoder trained at low resolution (64 px: 4 x 4 maps) run 512 -> 512
3x3 convs over a few dozen output pixels. There oneDNN's weight-gradient kernel, which torch's CPU
convolution backward uses, costs several times the multiply-adds it does (it reorders the 9 MB weight
gradient out of its blocked layout on every call; bench/README.md has the times). The same gradient is
one GEMM: grad_out as a (C_out, B*H*W) matrix times the unfolded input (B*H*W, C_in*9), the same sums in
a different order. `Conv3x3` takes that form only where it was measured to be faster - CPU, fp32 (no autocast), autograd
recording, stride 1, padding 1, at least `MIN_CHANNELS` in and out and at most `MAX_PIXELS` output pixels
per batch - and is a plain nn.Conv2d everywhere else (same parameters, same state-dict keys, same forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

MIN_CHANNELS = 512
MAX_PIXELS = 128  # batch x H x W of the output


def gemm_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """d(loss)/d(weight) of a 3x3, stride-1, padding-1 conv, as (C_out, B*H*W) @ (B*H*W, C_in*9)."""
    b, c_out, h, w = grad.shape
    cols = F.unfold(x, 3, padding=1)  # (B, C_in*9, H*W), rows in the weight's (c_in, kh, kw) order
    g = grad.reshape(b, c_out, h * w).transpose(0, 1).reshape(c_out, b * h * w)
    return (g @ cols.transpose(1, 2).reshape(b * h * w, -1)).reshape(weight_shape)


class _SmallMapConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=1)
        if ctx.needs_input_grad[1]:
            grad_w = gemm_weight_grad(grad, x, weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def takes_gemm_weight_grad(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
        and not torch.is_autocast_enabled("cpu")  # under bf16 autocast the conv (and its gradient) is bf16
        and torch.is_grad_enabled() and conv.weight.requires_grad
        and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and conv.in_channels >= MIN_CHANNELS and conv.out_channels >= MIN_CHANNELS
        and x.shape[0] * x.shape[2] * x.shape[3] <= MAX_PIXELS
        and not torch.compiler.is_compiling()
    )


class Conv3x3(nn.Conv2d):
    """nn.Conv2d with the GEMM weight gradient where `takes_gemm_weight_grad` says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_gemm_weight_grad(self, x):
            return _SmallMapConv3x3.apply(x, self.weight, self.bias)
        return super().forward(x)
