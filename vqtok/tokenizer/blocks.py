"""Building blocks of the conv autoencoders: GroupNorm, residual blocks, attention, resampling.

Three families of official checkpoints are covered, and their differences live here as flags so the
module attribute names can reproduce each family's state-dict keys unchanged:

- MaskGIT-VQGAN (the RAR/TiTok tokenizer port): bias-free 3x3 convs in the residual blocks and when a
  block changes width the shortcut is `nin_shortcut(h)` applied to the block's *output* (so the result
  is h + conv1x1(h)); downsampling is a parameter-free 2x2 average pool.
- VAR and LlamaGen (taming-style): convs with bias, the usual `nin_shortcut(x) + h`, downsampling by a
  zero pad on the right/bottom followed by a stride-2 3x3 conv, self-attention at the lowest level.
  VAR fuses q/k/v into one `qkv` 1x1 conv; LlamaGen keeps separate `q`, `k`, `v`.

Every GroupNorm uses 32 groups and eps 1e-6, as all three references do.

Speed (measured in bench/bench_tokenizer.py; numbers in bench/README.md): without autograd the SiLUs and
residual adds run in place, because on CPU every fresh full-resolution tensor (33 MB per image at
128 x 256 x 256) costs more in page faults than the op itself; with autograd they stay out of place so
backward sees the values it needs. Nearest-x2-then-3x3-conv runs as one 2x2 conv per output phase on the
low-resolution input (`upsample2x_conv3x3`): the same sums with 4/9 of the multiplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.tokenizer.small_map_conv import Conv3x3

NORM_GROUPS = 32
NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % NORM_GROUPS:
        raise ValueError(f"GroupNorm needs a channel count divisible by {NORM_GROUPS}, got {channels}")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


def conv3x3(cin: int, cout: int, bias: bool = True, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    # an nn.Conv2d; on small, wide CPU maps its weight gradient is one GEMM (vqtok/tokenizer/small_map_conv.py)
    return Conv3x3(cin, cout, kernel_size=3, stride=stride, padding=padding, bias=bias)


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=bias)


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last (and not also plain contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def in_place_ok() -> bool:
    """True when no autograd graph is being recorded, so activations may be overwritten in place."""
    return not torch.is_grad_enabled()


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)); the norm's output is a fresh tensor, so without autograd SiLU reuses it."""
    return F.silu(norm(x), inplace=in_place_ok())


def add_residual(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, accumulating into `fresh` (a tensor this block just made) when autograd is off."""
    return fresh.add_(other) if in_place_ok() else fresh + other


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a shortcut.

    `maskgit=True` reproduces the MaskGIT-VQGAN port: bias-free convs and, when the width changes, the
    shortcut computed from the block output with an (out, out) 1x1 kernel instead of from the input.
    """

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, maskgit: bool = False):
        super().__init__()
        bias = not maskgit
        self.maskgit = maskgit
        self.norm1 = group_norm(cin)
        self.conv1 = conv3x3(cin, cout, bias=bias)
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(cout, cout, bias=bias)
        self.changes_width = cin != cout
        if self.changes_width:
            self.nin_shortcut = conv1x1(cout if maskgit else cin, cout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if not self.changes_width:
            return add_residual(h, x)
        if self.maskgit:
            return add_residual(self.nin_shortcut(h), h)  # the port's quirk: shortcut of the output, input dropped
        return add_residual(self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over H*W positions, scale C^-0.5, residual output.

    `fused=True` holds one `qkv` conv whose output rows are q, k, v in that order (VAR);
    otherwise separate `q`, `k`, `v` convs (taming / LlamaGen).
    """

    def __init__(self, channels: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.norm = group_norm(channels)
        if fused:
            self.qkv = conv1x1(channels, 3 * channels)
        else:
            self.q = conv1x1(channels, channels)
            self.k = conv1x1(channels, channels)
            self.v = conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        if self.fused:
            q, k, v = self.qkv(h).reshape(b, 3, c, hh * ww).unbind(1)
        else:
            q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        # (B, 1, HW, C): one head of width C; SDPA's default scale is C^-0.5 like the references.
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, HW, C) -> (B, C, H, W) in the layout x came in: the plain transposed view is channels-last, which
        # for an NCHW input would spread through every later conv and norm (each conv re-laying its weight)
        out = out.squeeze(1).transpose(1, 2)
        if not is_channels_last(x):
            out = out.contiguous()
        return add_residual(self.proj_out(out.reshape(b, c, hh, ww)), x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (taming, VAR, LlamaGen)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x_conv3x3(x, self.conv)


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a 3-tap kernel axis into the two 2-tap kernels that act on the un-upsampled input.

    After nearest x2, output row 2i sees input rows (i-1, i, i) through taps (w0, w1, w2), so its kernel on the
    original rows (i-1, i) is (w0, w1 + w2); output row 2i+1 sees (i, i, i+1), i.e. rows (i, i+1) with
    (w0 + w1, w2). Columns fold the same way.
    """
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


# Below this many input pixels (batch x H x W) folding the kernels costs more than the saved multiplies
# (on CPU 8x8 inputs are slower in the phase form, 16x16 and up faster; bench/README.md has the times).
UPSAMPLE_PHASES_MIN_PIXELS = 256


def upsample2x_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_upsample_x2(x)) for a 3x3, stride-1, padding-1 conv, without the 4x upsampled tensor.

    One conv with 2x2 kernels and 4 * C_out channels (one block per output phase (a, b)) over x padded by one
    gives each phase on an (H+1, W+1) grid; phase (a, b) is its [a:a+H, b:b+W] window, written to the
    output pixels (2i+a, 2j+b). This does 16/36 of the multiply-adds of the direct form (CPU times at
    the decoder's sizes are in bench/README.md); results differ from it only by float rounding (~1e-6
    relative).
    Small inputs take the direct form: there the (H+1)(W+1) border and the kernel folding dominate.
    """
    if x.shape[0] * x.shape[-2] * x.shape[-1] < UPSAMPLE_PHASES_MIN_PIXELS:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    weight, bias = conv.weight, conv.bias
    c_out = weight.shape[0]
    kernels = [kr for kr_row in _phase_taps(weight, 2) for kr in _phase_taps(kr_row, 3)]  # phases 00, 01, 10, 11
    phases = F.conv2d(x, torch.cat(kernels, 0), None if bias is None else bias.repeat(4), padding=1)
    b, _, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format  # keep the caller's layout
    out = torch.empty((b, c_out, 2 * h, 2 * w), dtype=phases.dtype, device=phases.device, memory_format=fmt)
    for p, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, c::2] = phases[:, p * c_out:(p + 1) * c_out, a:a + h, c:c + w]
    return out
