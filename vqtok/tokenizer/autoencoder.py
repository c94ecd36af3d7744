"""The conv encoder and decoder of every vqtok tokenizer, in three styles.

One family, configured by `AutoencoderConfig`; the `style` picks the quirks and the module names so that
each official checkpoint loads with its own keys unchanged:

    style     level container             mid                        resampling
    maskgit   encoder.down.{i}.block.{j}  mid.{j} (res blocks only)  avg-pool / up.{i}.upsample_conv
              decoder.up.{i}.block.{j}
    var       encoder.down.{i}.block.{j}  mid.block_1/attn_1/block_2 down.{i}.downsample.conv
              (+ .attn.{j} at the lowest) decoder.up.{i}.upsample.conv
    llamagen  encoder.conv_blocks.{i}.res.{j}, mid.{0,1,2}           conv_blocks.{i}.downsample.conv
              decoder.conv_blocks.{k}.res.{j} with k = lowest-resolution level first

Level i has width ch * ch_mult[i]; the encoder halves the resolution after every level but the last,
the decoder mirrors it (level L-1 first). Attention (var/llamagen) follows each residual block of the
lowest-resolution level and sits in the middle block.

Memory layout: on CPU both networks run in channels-last (NHWC) internally for batches of at least
CHANNELS_LAST_MIN_PIXELS image pixels, and hand back ordinary contiguous tensors. oneDNN's NHWC convolutions
take and return that layout directly, while NCHW input makes every conv reorder its input into a blocked
layout and its output back; GroupNorm, SiLU, pooling and the adds have NHWC kernels too (the gain at
256 px is in bench/README.md). The price is a channels-last copy of each (NCHW) weight per call, which
outweighs the gain on small batches (64 px, batch 1 is slower), hence the threshold. Other
devices keep the caller's layout (the CUDA bench converts model and input to channels-last itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.tokenizer.blocks import (
    AttnBlock, Downsample, ResnetBlock, Upsample, conv1x1, conv3x3, group_norm, norm_silu, upsample2x_conv3x3,
)
from vqtok.tokenizer.config import AutoencoderConfig


# Measured break-even of channels-last on CPU (maskgit-vqgan-f16: 64 px x 4 images or 128 px x 1), doubled.
CHANNELS_LAST_MIN_PIXELS = 32768


def _to_internal_layout(x: torch.Tensor, image_pixels: int) -> torch.Tensor:
    """x in channels-last when on CPU and the batch covers at least CHANNELS_LAST_MIN_PIXELS image pixels, else
    plain NCHW (a latent may arrive as a permuted, channels-last view from the quantizer)."""
    if x.device.type == "cpu" and image_pixels >= CHANNELS_LAST_MIN_PIXELS:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


class _Level(nn.Module):
    """One resolution level: residual blocks (each optionally followed by attention) then resampling.

    The residual blocks are registered under `blocks_name` ("block" or "res") to match the official keys.
    `resample` is "down_avgpool", "down_conv", "up_conv" (submodule `upsample.conv`), "up_conv_flat"
    (a conv registered directly as `upsample_conv`, MaskGIT) or "" for none.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], blocks_name: str, resample: str, width: int):
        super().__init__()
        self.blocks_name = blocks_name
        setattr(self, blocks_name, nn.ModuleList(blocks))
        if attns is not None:
            self.attn = nn.ModuleList(attns)
        self.resample = resample
        if resample == "down_conv":
            self.downsample = Downsample(width)
        elif resample == "up_conv":
            self.upsample = Upsample(width)
        elif resample == "up_conv_flat":
            self.upsample_conv = conv3x3(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        attn = getattr(self, "attn", None)
        for j, block in enumerate(getattr(self, self.blocks_name)):
            h = block(h)
            if attn is not None and len(attn) > 0:
                h = attn[j](h)
        if self.resample == "down_avgpool":
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
        elif self.resample == "down_conv":
            h = self.downsample(h)
        elif self.resample == "up_conv":
            h = self.upsample(h)
        elif self.resample == "up_conv_flat":
            h = upsample2x_conv3x3(h, self.upsample_conv)
        return h


class _VarMid(nn.Module):
    """VAR's middle block: block_1 -> attn_1 -> block_2 (attn_1 is an identity without attention)."""

    def __init__(self, width: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(width, width, dropout)
        self.attn_1 = AttnBlock(width, fused=True) if attention else nn.Identity()
        self.block_2 = ResnetBlock(width, width, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _make_mid(cfg: AutoencoderConfig, width: int) -> nn.Module:
    if cfg.style == "maskgit":
        return nn.Sequential(*[ResnetBlock(width, width, cfg.dropout, maskgit=True) for _ in range(cfg.num_res_blocks)])
    if cfg.style == "var":
        return _VarMid(width, cfg.dropout, cfg.mid_attention)
    attn = AttnBlock(width, fused=False) if cfg.mid_attention else nn.Identity()
    return nn.Sequential(ResnetBlock(width, width, cfg.dropout), attn, ResnetBlock(width, width, cfg.dropout))


def _attn_list(cfg: AutoencoderConfig, lowest: bool, width: int, count: int) -> list[nn.Module] | None:
    if cfg.style == "maskgit":
        return None
    if not (lowest and cfg.attention):
        return []
    return [AttnBlock(width, fused=cfg.style == "var") for _ in range(count)]


class Encoder(nn.Module):
    """Images in the model's native range (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.validate()
        self.style = cfg.style
        maskgit = cfg.style == "maskgit"
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv3x3(cfg.in_channels, cfg.ch, bias=not maskgit)
        levels = []
        cin = cfg.ch
        last = len(widths) - 1
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, width, cfg.dropout, maskgit=maskgit))
                cin = width
            resample = "" if i == last else ("down_avgpool" if maskgit else "down_conv")
            attns = _attn_list(cfg, i == last, width, cfg.num_res_blocks)
            levels.append(_Level(blocks, attns, "res" if cfg.style == "llamagen" else "block", resample, width))
        if cfg.style == "llamagen":
            self.conv_blocks = nn.ModuleList(levels)
        else:
            self.down = nn.ModuleList(levels)
        self.mid = _make_mid(cfg, cin)
        self.norm_out = group_norm(cin)
        self.conv_out = conv1x1(cin, cfg.z_channels) if maskgit else conv3x3(cin, cfg.z_channels)

    @property
    def levels(self) -> nn.ModuleList:
        return self.conv_blocks if self.style == "llamagen" else self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_to_internal_layout(x, x.shape[0] * x.shape[-2] * x.shape[-1]))
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(norm_silu(self.norm_out, h)).contiguous()


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images in the model's native range (B, in_channels, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.validate()
        self.style = cfg.style
        self.upscale = cfg.downsample
        maskgit = cfg.style == "maskgit"
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n_blocks = cfg.decoder_blocks_per_level
        cin = widths[-1]
        self.conv_in = conv3x3(cfg.z_channels, cin)
        self.mid = _make_mid(cfg, cin)
        last = len(widths) - 1
        by_level: dict[int, _Level] = {}
        for i in reversed(range(len(widths))):  # lowest resolution first, as the forward pass runs
            width = widths[i]
            blocks = []
            for _ in range(n_blocks):
                blocks.append(ResnetBlock(cin, width, cfg.dropout, maskgit=maskgit))
                cin = width
            resample = "" if i == 0 else ("up_conv_flat" if maskgit else "up_conv")
            attns = _attn_list(cfg, i == last, width, n_blocks)
            by_level[i] = _Level(blocks, attns, "res" if cfg.style == "llamagen" else "block", resample, width)
        if cfg.style == "llamagen":
            # LlamaGen indexes decoder levels in execution order: conv_blocks.0 is the lowest resolution.
            self.conv_blocks = nn.ModuleList([by_level[i] for i in reversed(range(len(widths)))])
        else:
            # MaskGIT and VAR index `up` by level (up.0 = full resolution) and run it backwards.
            self.up = nn.ModuleList([by_level[i] for i in range(len(widths))])
        self.norm_out = group_norm(cin)
        self.conv_out = conv3x3(cin, cfg.in_channels)

    def levels_in_order(self) -> list[nn.Module]:
        if self.style == "llamagen":
            return list(self.conv_blocks)
        return list(reversed(self.up))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        image_pixels = z.shape[0] * z.shape[-2] * z.shape[-1] * self.upscale**2
        h = self.mid(self.conv_in(_to_internal_layout(z, image_pixels)))
        for level in self.levels_in_order():
            h = level(h)
        return self.conv_out(norm_silu(self.norm_out, h)).contiguous()

    @property
    def last_layer_weight(self) -> nn.Parameter:
        return self.conv_out.weight
