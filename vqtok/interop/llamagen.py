"""LlamaGen's VQ tokenizers (FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`).

`vq_ds16_c2i.pt` keeps its weights under `checkpoint["model"]` (older training checkpoints also pickle an
argparse.Namespace beside them, which is why `--trust-pickle` exists). Taming-style blocks with separate
q/k/v attention, 1x1 quant convs, l2-normalised codes, images in [-1, 1]. vqtok's `llamagen` style uses
the same names, so every key maps to itself:

    encoder.conv_blocks.{i}.res.{j}.*, .attn.{j}.{norm,q,k,v,proj_out}.*, .downsample.conv.*
    encoder.mid.{0,1,2}.*  (res, attn, res), encoder.norm_out.*, encoder.conv_out.* [z, C, 3, 3]
    decoder.conv_blocks.{k}.*  (k = 0 is the LOWEST resolution: the decoder runs them in index order)
    quantize.embedding.weight [codebook, dim], quantize.codebook_used [window] (usage buffer, float)
    quant_conv.* [dim, z, 1, 1], post_quant_conv.* [z, dim, 1, 1]
"""

from __future__ import annotations

from typing import Mapping

import torch

from vqtok.errors import UserError
from vqtok.interop.common import convert_with, indices_under, official_config, require
from vqtok.tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig

NAME = "llamagen_vq"
DESCRIPTION = "LlamaGen VQ (vq_ds16_c2i.pt / vq_ds8_c2i.pt)"
TOKENS_PER_SIDE = 16


def matches(state: Mapping) -> bool:
    return (
        "encoder.conv_blocks.0.res.0.conv1.weight" in state
        and "decoder.conv_blocks.0.res.0.conv1.weight" in state
        and "quantize.embedding.weight" in state
        and "quant_conv.weight" in state
    )


def rename(key: str) -> str:
    return key  # vqtok's llamagen style reproduces the official names


def to_config(state: Mapping, resolution: int | None = None) -> TokenizerConfig:
    """The architecture from tensor shapes (a {key: shape} listing works too).

    Not recoverable from shapes: LlamaGen's l2-normalised codebook (on in every released model, so
    assumed) and beta 0.25 (a training setting).
    """
    fmt = DESCRIPTION
    ch = require(state, "encoder.conv_in.weight", fmt)[0]
    levels = indices_under(state, "encoder.conv_blocks.")
    widths = [require(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight", fmt)[0] for i in levels]
    dec_levels = indices_under(state, "decoder.conv_blocks.")
    dec_widths = [require(state, f"decoder.conv_blocks.{k}.res.0.conv1.weight", fmt)[0] for k in dec_levels]
    if list(reversed(dec_widths)) != widths:
        raise UserError(f"{fmt}: decoder_ch_mult differs from encoder_ch_mult, which vqtok does not support")
    last = levels[-1]
    num_res = len(indices_under(state, "encoder.conv_blocks.0.res."))
    dec_res = len(indices_under(state, "decoder.conv_blocks.0.res."))
    attention = f"encoder.conv_blocks.{last}.attn.0.q.weight" in state
    mid_attention = "encoder.mid.1.q.weight" in state
    z_channels = require(state, "encoder.conv_out.weight", fmt)[0]
    quant_kernel = require(state, "quant_conv.weight", fmt)[-1]
    codebook_size, dim = require(state, "quantize.embedding.weight", fmt)
    usage = require(state, "quantize.codebook_used", fmt)[0] if "quantize.codebook_used" in state else 0
    ae = AutoencoderConfig(
        style="llamagen", ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=num_res,
        decoder_num_res_blocks=None if dec_res == num_res + 1 else dec_res, z_channels=z_channels,
        attention=attention, mid_attention=mid_attention, quant_conv_kernel=quant_kernel,
    )
    params = {"codebook_size": codebook_size, "dim": dim, "l2_norm": True, "beta": 0.25, "usage_buffer": usage}
    return official_config(ae, QuantizerConfig(kind="vq", params=params), resolution or TOKENS_PER_SIDE * ae.downsample,
                           (-1.0, 1.0))


def convert(state: Mapping[str, torch.Tensor], resolution: int | None = None) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    return convert_with(to_config, rename, DESCRIPTION, state, resolution)


__all__ = ["NAME", "DESCRIPTION", "matches", "to_config", "convert", "rename"]
