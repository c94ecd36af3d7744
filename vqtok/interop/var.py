"""VAR's multi-scale VQVAE (FoundationVision/VAR `models/vqvae.py`): `vae_ch160v4096z32.pth`.

A plain state dict. Taming-style blocks with one fused `qkv` attention conv, 3x3 quant convs, images in
[-1, 1], and the multi-scale residual quantizer. vqtok's `var` style and `MultiScaleResidualVQ` use the
same names, so every key maps to itself:

    encoder.down.{i}.block.{j}.*, encoder.down.{last}.attn.{j}.{norm,qkv,proj_out}.*, .downsample.conv.*
    encoder.mid.{block_1,attn_1,block_2}.*, encoder.norm_out.*, encoder.conv_out.* [z, C, 3, 3]
    decoder.up.{i}.* (i = level, up.0 full resolution; run from the last level down)
    quantize.ema_vocab_hit_SV [scales, codebook]  (usage EMA buffer; its rows give the number of scales)
    quantize.quant_resi.qresi_ls.{i}.* (partially shared Phi), .qresi.* (shared) or .{i}.* (one per scale)
    quantize.embedding.weight [codebook, dim], quant_conv.* / post_quant_conv.* [dim, dim, k, k]

The patch-number schedule is not stored in the file: 10 scales means VAR's released schedule
(1,2,3,4,5,6,8,10,13,16); for another count pass `patch_nums` (default 1, 2, ..., K).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from vqtok.errors import UserError
from vqtok.interop.common import convert_with, indices_under, official_config, require
from vqtok.tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqtok.tokenizer.presets import VAR_PATCH_NUMS

NAME = "var_vqvae"
DESCRIPTION = "VAR multi-scale VQVAE (vae_ch160v4096z32.pth)"


def matches(state: Mapping) -> bool:
    return (
        "encoder.down.0.block.0.conv1.weight" in state
        and "quantize.embedding.weight" in state
        and "quant_conv.weight" in state
        and any(k.startswith("quantize.quant_resi.") for k in state)
    )


def rename(key: str) -> str:
    return key  # vqtok's var style and multi-scale quantizer reproduce the official names


def _phi_layout(state: Mapping) -> tuple[int, int]:
    """(share_quant_resi, default_qresi_counts) from the Phi keys."""
    shared = indices_under(state, "quantize.quant_resi.qresi_ls.")
    if shared:
        return len(shared), 0
    if "quantize.quant_resi.qresi.weight" in state:
        return 1, 0
    per_scale = indices_under(state, "quantize.quant_resi.")
    if per_scale:
        return 0, len(per_scale)
    raise UserError(f"this {DESCRIPTION} checkpoint has no quantize.quant_resi weights")


def to_config(
    state: Mapping, resolution: int | None = None, patch_nums: Sequence[int] | None = None, quant_resi: float = 0.5
) -> TokenizerConfig:
    """The architecture from tensor shapes (a {key: shape} listing works too)."""
    fmt = DESCRIPTION
    ch = require(state, "encoder.conv_in.weight", fmt)[0]
    levels = indices_under(state, "encoder.down.")
    widths = [require(state, f"encoder.down.{i}.block.0.conv1.weight", fmt)[0] for i in levels]
    num_res = len(indices_under(state, "encoder.down.0.block."))
    dec_res = len(indices_under(state, "decoder.up.0.block."))
    z_channels = require(state, "encoder.conv_out.weight", fmt)[0]
    quant_kernel = require(state, "quant_conv.weight", fmt)[-1]
    codebook_size, dim = require(state, "quantize.embedding.weight", fmt)
    num_scales = require(state, "quantize.ema_vocab_hit_SV", fmt)[0]
    if patch_nums is None:
        patch_nums = VAR_PATCH_NUMS if num_scales == len(VAR_PATCH_NUMS) else list(range(1, num_scales + 1))
    if len(patch_nums) != num_scales:
        raise UserError(f"{fmt}: the checkpoint has {num_scales} scales but {len(patch_nums)} patch numbers were given")
    share, counts = _phi_layout(state)
    ae = AutoencoderConfig(
        style="var", ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=num_res,
        decoder_num_res_blocks=None if dec_res == num_res + 1 else dec_res, z_channels=z_channels,
        attention=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in state,
        mid_attention="encoder.mid.attn_1.qkv.weight" in state, quant_conv_kernel=quant_kernel,
    )
    params = {"codebook_size": codebook_size, "dim": dim, "patch_nums": list(patch_nums), "beta": 0.25,
              "quant_resi": quant_resi, "share_quant_resi": share}
    if counts:
        params["default_qresi_counts"] = counts
    last = patch_nums[-1]
    last_side = int(last) if isinstance(last, int) else int(max(last))
    return official_config(ae, QuantizerConfig(kind="msvq", params=params), resolution or last_side * ae.downsample,
                           (-1.0, 1.0))


def convert(
    state: Mapping[str, torch.Tensor], resolution: int | None = None, patch_nums: Sequence[int] | None = None
) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    return convert_with(to_config, rename, DESCRIPTION, state, resolution, patch_nums)


__all__ = ["NAME", "DESCRIPTION", "matches", "to_config", "convert", "rename"]
