"""Image discriminators for tokenizer training.

- `StyleGANDiscriminator`: LlamaGen's StyleGAN-style D: residual blocks with a [1,2,1] blur before each
  strided conv, down to 4x4, then a linear head: one logit per image, (B,).
- `MaskGITDiscriminator`: the blur-resampled patch D bytedance/1d-tokenizer trains TiTok with: TF-"SAME"
  convs, BlurBlock downsampling, GroupNorm, LeakyReLU(0.1), adaptive max-pool to 16x16: a (B,1,16,16) map.
- `PatchGANDiscriminator`: taming's pix2pix NLayerDiscriminator with BatchNorm: a (B,1,h,w) map
  (30x30 at 256 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.errors import UserError


@dataclass
class DiscriminatorConfig:
    kind: Literal["stylegan", "maskgit", "patchgan"] = "patchgan"
    channels: int = 64  # patchgan ndf / maskgit base width; stylegan uses its resolution table
    layers: int = 3  # patchgan n_layers
    channel_scale: float = 1.0  # stylegan width multiplier (1.0 = LlamaGen's widths); tiny recipes shrink it


def _blur_kernel(taps: list[float]) -> torch.Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k2 = k[:, None] * k[None, :]
    return k2 / k2.sum()


class Blur(nn.Module):
    """Depthwise [1,2,1] x [1,2,1] blur with reflect padding (kornia.filter2d's defaults, as LlamaGen uses)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", _blur_kernel([1, 2, 1]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(c, 1, 3, 3)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, groups=c)


class StyleGANBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_res = nn.Conv2d(cin, cout, 1, stride=2)
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2),
        )
        self.downsample = nn.Sequential(Blur(), nn.Conv2d(cout, cout, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.downsample(self.net(x)) + self.conv_res(x)) / math.sqrt(2)


class StyleGANDiscriminator(nn.Module):
    """One logit per image; log2(resolution) - 2 residual blocks take the image down to 4x4."""

    WIDTHS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}

    def __init__(self, resolution: int, channel_scale: float = 1.0):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise UserError(f"the StyleGAN discriminator needs a power-of-two resolution >= 8, got {resolution}")
        self.resolution = resolution
        width = lambda r: max(8, int(self.WIDTHS[r] * channel_scale))  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(3, width(resolution), 3, padding=1), nn.LeakyReLU(0.2))
        blocks, r = [], resolution
        while r > 4:
            blocks.append(StyleGANBlock(width(r), width(r // 2)))
            r //= 2
        self.blocks = nn.Sequential(*blocks)
        c = width(4)
        self.final_conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2))
        self.final_linear = nn.Sequential(nn.Linear(c * 16, c), nn.LeakyReLU(0.2), nn.Linear(c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise UserError(f"the StyleGAN discriminator was built for {self.resolution} px, got {tuple(x.shape[-2:])}")
        h = self.final_conv(self.blocks(self.stem(x)))
        return self.final_linear(h.flatten(1)).squeeze(1)


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (asymmetric when the total is odd, extra on the bottom/right)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Conv2dSame(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))


class BlurDownsample(nn.Module):
    """1d-tokenizer BlurBlock: normalised (1,3,3,1) outer product, depthwise, stride 2 after SAME(k=4,s=2) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("kernel", _blur_kernel([1, 3, 3, 1])[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_same_pad(x, 4, 2), self.kernel.to(x.dtype), stride=2, groups=self.channels)


class MaskGITDiscriminator(nn.Module):
    """Patch logits (B,1,16,16) from 3 blur-downsampling stages (widths base x (1,1,2,4))."""

    def __init__(self, channels: int = 128, multipliers: tuple[int, ...] = (1, 1, 2, 4), pool: int = 16):
        super().__init__()
        groups = lambda c: math.gcd(32, c)  # noqa: E731  (32 groups at the paper's widths)
        self.block_in = nn.Sequential(Conv2dSame(3, channels * multipliers[0], 5), nn.LeakyReLU(0.1))
        stages = []
        for cin_m, cout_m in zip(multipliers[:-1], multipliers[1:]):
            cin, cout = channels * cin_m, channels * cout_m
            stages.append(nn.Sequential(
                Conv2dSame(cin, cout, 3), BlurDownsample(cout), nn.GroupNorm(groups(cout), cout), nn.LeakyReLU(0.1),
            ))
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d((pool, pool))
        c = channels * multipliers[-1]
        self.to_logits = nn.Sequential(Conv2dSame(c, c, 1), nn.LeakyReLU(0.1), Conv2dSame(c, 1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logits(self.pool(self.blocks(self.block_in(x))))


class PatchGANDiscriminator(nn.Module):
    """taming NLayerDiscriminator: conv4 s2 + LReLU, (n-1) x [conv4 s2, BN, LReLU], conv4 s1 + BN + LReLU, conv4 s1."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # pix2pix init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def build_discriminator(cfg: DiscriminatorConfig, resolution: int) -> nn.Module:
    if cfg.kind == "stylegan":
        return StyleGANDiscriminator(resolution, cfg.channel_scale)
    if cfg.kind == "maskgit":
        return MaskGITDiscriminator(cfg.channels)
    if cfg.kind == "patchgan":
        return PatchGANDiscriminator(cfg.channels, cfg.layers)
    raise UserError(f"unknown discriminator kind '{cfg.kind}'; use stylegan, maskgit or patchgan")
