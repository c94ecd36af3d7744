"""Official RAR weights (bytedance/1d-tokenizer `rar_{b,l,xl,xxl}.bin`) -> vqtok generator checkpoint.

vqtok's RAR keeps the official state-dict keys, so conversion is a checked identity: every official key
is listed explicitly, must be present with the shape the detected config implies, and every key of the
file must be used. The size is read from the tensor shapes, so any RAR size (and the fixtures' tiny
random ones) converts the same way.

    vqtok convert rar_b.bin --out checkpoints/rar-b
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vqtok.ar.rar import POS_TABLE_EXTRA, TIMESTEP_TABLE_EXTRA, RARConfig
from vqtok.errors import UserError
from vqtok.interop.common import check_exact_keys

NAME = "rar"

# What the released RAR checkpoints were trained on: the MaskGIT-VQGAN port, 256 px, 16x16 tokens.
OFFICIAL_TOKENIZER = {
    "preset": "maskgit-vqgan-f16",
    "vocab_size": 1024,
    "scales": [[16, 16]],
    "tokens_per_image": 256,
    "resolution": 256,
    "value_range": [0.0, 1.0],
}

_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias",
    "attn.q_norm.weight", "attn.q_norm.bias",
    "attn.k_norm.weight", "attn.k_norm.bias",
    "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
]
_SIGNATURE = ("target_aware_pos_embed", "timesteps_embeddings", "adaln_before_head.adaLN_modulation.1.weight", "lm_head.weight")


def matches(sd: dict[str, Any]) -> bool:
    return all(k in sd for k in _SIGNATURE)


def expected_shapes(cfg: RARConfig) -> dict[str, tuple[int, ...]]:
    """Every official key with its shape, in the official state-dict order."""
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    block = {
        "norm1.weight": (D,), "norm1.bias": (D,),
        "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
        "attn.q_norm.weight": (hd,), "attn.q_norm.bias": (hd,),
        "attn.k_norm.weight": (hd,), "attn.k_norm.bias": (hd,),
        "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "norm2.weight": (D,), "norm2.bias": (D,),
        "mlp.fc1.weight": (I, D), "mlp.fc1.bias": (I,),
        "mlp.fc2.weight": (D, I), "mlp.fc2.bias": (D,),
        "adaLN_modulation.1.weight": (6 * D, D), "adaLN_modulation.1.bias": (6 * D,),
    }
    assert list(block) == _BLOCK_KEYS
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, cfg.seq_len + POS_TABLE_EXTRA, D),
        "target_aware_pos_embed": (1, cfg.seq_len + POS_TABLE_EXTRA, D),
        "timesteps_embeddings": (1, cfg.seq_len + TIMESTEP_TABLE_EXTRA, D),
    }
    for i in range(cfg.depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    shapes.update({
        "embeddings.weight": (cfg.embedding_rows, D),
        "adaln_before_head.adaLN_modulation.1.weight": (2 * D, D),
        "adaln_before_head.adaLN_modulation.1.bias": (2 * D,),
        "lm_head.weight": (cfg.vocab_size, D),
        "lm_head.bias": (cfg.vocab_size,),
    })
    return shapes


def to_config(sd: dict[str, Any]) -> RARConfig:
    """Read the model size from the tensor shapes (works on real, meta or shape-only entries)."""
    if not matches(sd):
        raise UserError("these weights are not an official RAR state dict (no target_aware_pos_embed / timesteps_embeddings)")
    shape = lambda k: tuple(sd[k].shape) if hasattr(sd[k], "shape") else tuple(sd[k])  # noqa: E731
    hidden = shape("cls_token")[-1]
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    head_dim = shape("blocks.0.attn.q_norm.weight")[0]
    vocab = shape("lm_head.weight")[0]
    seq_len = shape("timesteps_embeddings")[1] - TIMESTEP_TABLE_EXTRA
    return RARConfig(
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // head_dim,
        intermediate_size=shape("blocks.0.mlp.fc1.weight")[0],
        vocab_size=vocab,
        seq_len=seq_len,
        num_classes=shape("embeddings.weight")[0] - vocab - 2,
        # the official training settings; they only matter when fine-tuning
        dropout=0.1, attn_dropout=0.1, class_dropout=0.1,
    )


def convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> vqtok RAR state dict (same names), every key used, every shape asserted."""
    wanted = expected_shapes(to_config(sd))
    check_exact_keys(sd, wanted, "RAR", "is this an official RAR file?")
    return {key: sd[key] for key in wanted}


def save_converted(sd: dict[str, torch.Tensor], out_dir: str | Path, tokenizer: dict | None = None) -> Path:
    """Write a vqtok generator checkpoint directory from an official state dict.

    `tokenizer` is the identity of the tokenizer the weights were trained on; by default the released
    models' MaskGIT-VQGAN when the shapes match it (1024 codes, 256 tokens).
    """
    from vqtok.ar.checkpoint import save_generator

    cfg = to_config(sd)
    state = convert(sd)
    if tokenizer is None:
        official = cfg.vocab_size == OFFICIAL_TOKENIZER["vocab_size"] and cfg.seq_len == OFFICIAL_TOKENIZER["tokens_per_image"]
        tokenizer = dict(OFFICIAL_TOKENIZER) if official else {"vocab_size": cfg.vocab_size, "tokens_per_image": cfg.seq_len}
    extra = {"source": "official RAR weights (bytedance/1d-tokenizer)"}
    return save_generator(out_dir, state, cfg, tokenizer, extra)
