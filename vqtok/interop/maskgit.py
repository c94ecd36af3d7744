"""MaskGIT-VQGAN as released for RAR/TiTok: `maskgit-vqgan-imagenet-f16-256.bin` (HF fun-research/TiTok).

A plain state dict with `encoder.*`, `decoder.*`, `quantize.embedding.weight`; bias-free encoder convs,
no quant convs, images in [0, 1]. vqtok's `maskgit` autoencoder style uses the same module names, so
every key maps to itself:

    encoder.conv_in.weight                    [ch, 3, 3, 3]      (no bias)
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2}.*, .nin_shortcut.weight [out, out, 1, 1]
    encoder.mid.{j}.*, encoder.norm_out.*, encoder.conv_out.{weight,bias} [z, C, 1, 1]
    decoder.conv_in.*, decoder.mid.{j}.*, decoder.up.{i}.block.{j}.*, decoder.up.{i}.upsample_conv.*
    decoder.norm_out.*, decoder.conv_out.*
    quantize.embedding.weight                 [codebook, z]
"""

from __future__ import annotations

from typing import Mapping

import torch

from vqtok.interop.common import convert_with, indices_under, official_config, require
from vqtok.tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig

NAME = "maskgit_vqgan"
DESCRIPTION = "MaskGIT-VQGAN (RAR/TiTok tokenizer, maskgit-vqgan-imagenet-f16-256.bin)"
TOKENS_PER_SIDE = 16  # the nominal resolution is 16 tokens per side (256 px for the released f16 model)


def matches(state: Mapping) -> bool:
    return (
        "encoder.down.0.block.0.conv1.weight" in state
        and "quantize.embedding.weight" in state
        and "encoder.conv_in.weight" in state
        and "encoder.conv_in.bias" not in state      # MaskGIT's convs are bias-free
        and "quant_conv.weight" not in state
        and "decoder.up.0.block.0.conv1.weight" in state
    )


def rename(key: str) -> str:
    return key  # vqtok's maskgit style reproduces the official names


def to_config(state: Mapping, resolution: int | None = None) -> TokenizerConfig:
    """The architecture, read from tensor shapes alone (works on a {key: shape} listing too)."""
    fmt = DESCRIPTION
    ch = require(state, "encoder.conv_in.weight", fmt)[0]
    levels = indices_under(state, "encoder.down.")
    mult = [require(state, f"encoder.down.{i}.block.0.conv1.weight", fmt)[0] // ch for i in levels]
    num_res = len(indices_under(state, "encoder.down.0.block."))
    dec_res = len(indices_under(state, "decoder.up.0.block."))
    z_channels = require(state, "encoder.conv_out.weight", fmt)[0]
    codebook_size, dim = require(state, "quantize.embedding.weight", fmt)
    ae = AutoencoderConfig(
        style="maskgit", ch=ch, ch_mult=mult, num_res_blocks=num_res, decoder_num_res_blocks=dec_res,
        z_channels=z_channels, attention=False, mid_attention=False, quant_conv_kernel=0,
    )
    if ae.decoder_num_res_blocks == ae.num_res_blocks:
        ae.decoder_num_res_blocks = None  # the style's default; keeps the config equal to the preset's
    params = {"codebook_size": codebook_size, "dim": dim, "beta": 0.25, "beta_on": "codebook"}
    return official_config(ae, QuantizerConfig(kind="vq", params=params), resolution or TOKENS_PER_SIDE * ae.downsample,
                           (0.0, 1.0))


def convert(state: Mapping[str, torch.Tensor], resolution: int | None = None) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    return convert_with(to_config, rename, DESCRIPTION, state, resolution)


__all__ = ["NAME", "DESCRIPTION", "matches", "to_config", "convert", "rename"]
