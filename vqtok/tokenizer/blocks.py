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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32
NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % NORM_GROUPS:
        raise ValueError(f"GroupNorm needs a channel count divisible by {NORM_GROUPS}, got {channels}")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


def conv3x3(cin: int, cout: int, bias: bool = True, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding, bias=bias)


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=bias)


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
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if not self.changes_width:
            return x + h
        if self.maskgit:
            return h + self.nin_shortcut(h)  # the port's quirk: shortcut of the output, input dropped
        return self.nin_shortcut(x) + h


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
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


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
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def nearest_up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
