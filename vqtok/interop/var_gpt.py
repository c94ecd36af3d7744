"""Official VAR generator weights (FoundationVision/VAR `var_d16.pth` ... `var_d30.pth`) -> vqtok VAR.

The released files are plain state dicts of `models/var.py::VAR`; vqtok's VAR (vqtok/ar/var.py) keeps
every key, so the mapping is a checked identity: every official key must be present with the shape the
detected configuration implies, and every key of the file must be used.

    pos_start [1, first_l, C]  pos_1LC [1, L, C]  lvl_1L [1, L] (int)  attn_bias_for_masking [1, 1, L, L]
    word_embed.* [C, Cvae]  class_emb.weight [num_classes + 1, C]  lvl_embed.weight [K, C]
    shared_ada_lin.1.* [6C, C]              (shared_aln variants only)
    blocks.{i}.ada_gss [1, 1, 6, C]         (shared_aln) | blocks.{i}.ada_lin.1.* [6C, C]
    blocks.{i}.attn.{scale_mul_1H11 [1, H, 1, 1], q_bias, v_bias, zero_k_bias, mat_qkv.weight, proj.*}
    blocks.{i}.ffn.{fc1, fc2}.*   head_nm.ada_lin.1.* [2C, C]   head.* [V, C]

The generator is tied to its tokenizer: it predicts the tokenizer's V codes and embeds its Cvae-channel
f_hat at the tokenizer's scales, and its next-scale inputs come from the tokenizer's codebook and Phi.
None of that is in the file, so conversion needs the multi-scale tokenizer (a vqtok Tokenizer, its
quantizer, or a TokenizerConfig): without it, with a single-scale one, or with another vocabulary, code
dimension or scale schedule, conversion stops with one UserError line. The scale schedule of a file with
tensors is also read from `lvl_1L` (how many positions each level has) and must equal the tokenizer's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vqtok.ar.var import VAR, VARConfig
from vqtok.errors import UserError
from vqtok.interop.common import indices_under, require, shape_of

NAME = "var_gpt"
DESCRIPTION = "VAR next-scale generator (var_d16.pth ... var_d30.pth)"

_SIGNATURE = ("pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "lvl_embed.weight", "class_emb.weight",
              "word_embed.weight", "head_nm.ada_lin.1.weight", "head.weight")


def matches(state: Mapping) -> bool:
    return all(k in state for k in _SIGNATURE)


def tokenizer_geometry(tokenizer: Any) -> tuple[int, int, list[int]]:
    """(codebook size V, code dimension Cvae, square scale sides) of a multi-scale tokenizer: a vqtok
    Tokenizer, its MultiScaleResidualVQ, or a TokenizerConfig. UserError when absent or single-scale."""
    if tokenizer is None:
        raise UserError("converting a VAR generator needs its multi-scale tokenizer (the VAR VQVAE it was trained "
                        "with, e.g. vae_ch160v4096z32.pth converted by vqtok): pass it with --tokenizer")
    quantizer = getattr(tokenizer, "quantize", tokenizer)
    if isinstance(quantizer, nn.Module):
        if not hasattr(quantizer, "next_scale_input"):
            raise UserError("a VAR generator needs a multi-scale (msvq) tokenizer; the given tokenizer is single-scale")
        scales = [tuple(int(v) for v in s) for s in quantizer.scales]
        V, dim = int(quantizer.codebook_size), int(quantizer.dim)
    else:
        qcfg = getattr(tokenizer, "quantizer", None)
        if qcfg is None or getattr(qcfg, "kind", None) != "msvq":
            raise UserError("a VAR generator needs a multi-scale (msvq) tokenizer; the given tokenizer is single-scale")
        from vqtok.tokenizer.quantizers.multiscale import MultiScaleVQConfig, scale_sizes

        params = MultiScaleVQConfig(**qcfg.params)
        scales, V, dim = scale_sizes(params.patch_nums), params.codebook_size, params.dim
    for h, w in scales:
        if h != w:
            raise UserError(f"a VAR generator needs square scales; the tokenizer has a {h}x{w} scale")
    return V, dim, [h for h, _ in scales]


def _patch_nums_from_levels(lvl_1L: torch.Tensor) -> list[int]:
    counts = torch.bincount(lvl_1L.reshape(-1).long()).tolist()
    sides = [math.isqrt(int(c)) for c in counts]
    if any(s * s != c for s, c in zip(sides, counts)) or lvl_1L.reshape(-1).tolist() != sorted(lvl_1L.reshape(-1).tolist()):
        raise UserError(f"this {DESCRIPTION} checkpoint's lvl_1L does not describe square scales coarse to fine")
    return sides


def to_config(state: Mapping, tokenizer: Any, num_heads: int | None = None) -> VARConfig:
    """The architecture from the tensor shapes (a {key: shape} listing works too) and the tokenizer."""
    if not matches(state):
        raise UserError("these weights are not an official VAR generator state dict (no pos_1LC / lvl_1L)")
    fmt = DESCRIPTION
    V_tok, dim_tok, sides = tokenizer_geometry(tokenizer)
    C = require(state, "pos_start", fmt)[-1]
    first_l = require(state, "pos_start", fmt)[1]
    L = require(state, "pos_1LC", fmt)[1]
    K = require(state, "lvl_embed.weight", fmt)[0]
    V = require(state, "head.weight", fmt)[0]
    Cvae = require(state, "word_embed.weight", fmt)[1]
    depth = len(indices_under(state, "blocks."))
    if depth == 0:
        raise UserError(f"this {fmt} checkpoint has no transformer blocks")
    if V != V_tok:
        raise UserError(f"this VAR generator predicts {V} codes but the tokenizer has {V_tok}; use the tokenizer it "
                        f"was trained with")
    if Cvae != dim_tok:
        raise UserError(f"this VAR generator embeds {Cvae}-channel codes but the tokenizer's have {dim_tok}")
    lvl = state["lvl_1L"]
    if isinstance(lvl, torch.Tensor) and lvl.device.type != "meta":
        found = _patch_nums_from_levels(lvl)
        if found != sides:
            raise UserError(f"this VAR generator was built for scales {found} but the tokenizer has {sides}")
    if (K, L, first_l) != (len(sides), sum(s * s for s in sides), sides[0] ** 2):
        raise UserError(f"this VAR generator has {K} scales and {L} positions but the tokenizer's scales {sides} "
                        f"make {len(sides)} and {sum(s * s for s in sides)}")
    if "blocks.0.attn.scale_mul_1H11" in state:
        heads, l2 = require(state, "blocks.0.attn.scale_mul_1H11", fmt)[1], True
    else:  # without l2-normalised attention the head count is not in the shapes: the release rule
        heads, l2 = (num_heads or depth), False
    if num_heads is not None and num_heads != heads:
        raise UserError(f"this VAR generator has {heads} attention heads, not {num_heads}")
    if C % heads:
        raise UserError(f"this VAR generator's width {C} is not divisible by {heads} heads")
    hidden = require(state, "blocks.0.ffn.fc1.weight", fmt)[0]
    return VARConfig(
        depth=depth, embed_dim=C, num_heads=heads, mlp_ratio=hidden / C,
        num_classes=require(state, "class_emb.weight", fmt)[0] - 1, vocab_size=V, codebook_dim=Cvae,
        patch_nums=sides, shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=l2,
        # the released training settings (`build_vae_var`); they only matter when fine-tuning
        drop_path_rate=0.1 * depth / 24, class_dropout=0.1,
    )


def expected_shapes(cfg: VARConfig) -> dict[str, tuple[int, ...]]:
    """{key: shape} of vqtok's VAR for `cfg`, in state-dict order, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VAR(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_keys(state: Mapping, tokenizer: Any, num_heads: int | None = None) -> tuple[VARConfig, dict[str, str]]:
    """(config, {official key: vqtok key}) after checking every key is used once, none missing, shapes equal."""
    cfg = to_config(state, tokenizer, num_heads)
    want = expected_shapes(cfg)
    mapping: dict[str, str] = {}
    for key, value in state.items():
        if key not in want:
            raise UserError(f"{DESCRIPTION} key {key} has no place in the detected architecture")
        if shape_of(value) != want[key]:
            raise UserError(f"{DESCRIPTION} key {key} has shape {list(shape_of(value))} but the architecture needs "
                            f"{list(want[key])}")
        mapping[key] = key
    missing = [k for k in want if k not in mapping]
    if missing:
        raise UserError(f"this {DESCRIPTION} checkpoint lacks {len(missing)} tensor(s) the architecture needs, "
                        f"e.g. {missing[0]}")
    return cfg, mapping


def convert(state: Mapping[str, torch.Tensor], tokenizer: Any = None, num_heads: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Official state dict -> vqtok VAR state dict (vqtok's order), every key and shape checked against the
    architecture `to_config` detects with `tokenizer` (required: UserError without it)."""
    cfg, mapping = check_keys(state, tokenizer, num_heads)
    return {key: state[key] for key in expected_shapes(cfg) if key in mapping}


def load(state: Mapping[str, torch.Tensor], tokenizer: Any, num_heads: int | None = None) -> VAR:
    """A ready VAR (eval mode) from an official state dict, bound to the tokenizer's quantizer."""
    cfg = to_config(state, tokenizer, num_heads)
    converted = convert(state, tokenizer, num_heads)
    model = VAR(cfg)
    model.load_state_dict(converted, strict=True)
    quantizer = getattr(tokenizer, "quantize", tokenizer)
    if isinstance(quantizer, nn.Module):
        model.bind_quantizer(quantizer)
    return model.eval()


def save_converted(state: Mapping[str, torch.Tensor], out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a vqtok generator checkpoint directory from an official VAR state dict.

    `tokenizer` is the multi-scale tokenizer the generator was trained with: a vqtok tokenizer checkpoint
    directory (converted from the VAR VQVAE with `vqtok convert vae_ch160v4096z32.pth`) or a loaded
    Tokenizer. The checkpoint records its identity and, for a directory, its path, so `vqtok sample` finds
    and checks it.
    """
    from vqtok.ar.checkpoint import save_generator

    path = None
    if isinstance(tokenizer, (str, Path)):
        from vqtok.tokenizer.tokenizer import load_tokenizer

        path = Path(tokenizer)
        if not path.is_dir():
            raise UserError(f"--tokenizer {path} is not a vqtok tokenizer checkpoint directory")
        tokenizer = load_tokenizer(path)
    cfg = to_config(state, tokenizer)
    converted = convert(state, tokenizer)
    identity_of = getattr(tokenizer, "identity", None)
    if not callable(identity_of):
        raise UserError("converting a VAR generator needs its tokenizer as a vqtok tokenizer checkpoint (--tokenizer DIR)")
    identity = identity_of()
    if path is not None:
        identity["path"] = str(path.resolve())
    extra = {"source": "official VAR weights (FoundationVision/VAR)"}
    return save_generator(out_dir, converted, cfg, identity, extra)


__all__ = ["NAME", "DESCRIPTION", "matches", "tokenizer_geometry", "to_config", "expected_shapes", "check_keys",
           "convert", "load", "save_converted"]
