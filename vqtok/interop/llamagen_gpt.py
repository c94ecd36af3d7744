"""Official LlamaGen c2i GPT weights (FoundationVision/LlamaGen `c2i_{B,L}_{256,384}.pt`, `c2i_XL_384.pt`,
`c2i_XXL_384.pt`, `c2i_3B_384.pt`) -> vqtok's LlamaGen.

vqtok's LlamaGen keeps the official state-dict keys, so conversion is a checked identity: the model size is
read from the tensor shapes (the head count from the official size table), every key the detected size needs
must be present with its shape, and every tensor of the file must be used. Entries that are not weights are
dropped by name: a `freqs_cis` table and the KV-cache buffers (`layers.N.attention.kv_cache.*`) that the
official `generate()` attaches. The DDP releases keep the weights under `checkpoint["model"]` (or "ema" /
"module" / "state_dict"); the FSDP ones (XXL, 3B) are the bare state dict; `unwrap` handles both.

The token count is not in the weights (the rotary table is not saved): the 256-px releases have 16x16 = 256
tokens, the 384-px ones 24x24 = 576, read from the file name `c2i_<size>_<px>.pt` or given as `block_size`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from vqtok.ar.llamagen import SIZES, LlamaGenConfig
from vqtok.errors import UserError
from vqtok.interop.common import check_exact_keys

NAME = "llamagen_gpt"
DESCRIPTION = "LlamaGen class-conditional GPT (FoundationVision/LlamaGen c2i_*.pt)"

_SIGNATURE = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight", "output.weight")
_LAYER_KEYS = (
    "attention.wqkv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
    "attention_norm.weight", "ffn_norm.weight",
)
_NOT_WEIGHTS = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache))$")
_PREFIXES = ("module.", "_orig_mod.")
_CONTAINERS = ("model", "ema", "module", "state_dict")
# what the released models were trained on: vq_ds16_c2i (vqtok preset llamagen-vq-f16), 16384 codes, 16x downsampling
OFFICIAL_TOKENIZER = {"preset": "llamagen-vq-f16", "vocab_size": 16384, "value_range": [-1.0, 1.0]}
_PIXELS = re.compile(r"c2i_[A-Za-z0-9]+_(\d+)")


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(int(v) for v in value)


def _strip(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the wrapper prefixes DDP / torch.compile add ("module.", "_orig_mod.") when every key has one."""
    out = dict(sd)
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def unwrap(checkpoint: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
    """The state dict inside an official checkpoint: `checkpoint[key]`, else the first of model / ema / module /
    state_dict that is a dict, else the checkpoint itself when it is a flat state dict (FSDP releases)."""
    if key is not None:
        if key not in checkpoint or not isinstance(checkpoint[key], Mapping):
            raise UserError(f"this LlamaGen checkpoint has no state dict under '{key}' (it has: {', '.join(map(str, checkpoint)) or 'nothing'})")
        return _strip(checkpoint[key])
    if matches(checkpoint):
        return _strip(checkpoint)
    for name in _CONTAINERS:
        if isinstance(checkpoint.get(name), Mapping):
            return _strip(checkpoint[name])
    raise UserError(
        "this file is not a LlamaGen GPT checkpoint: no LlamaGen keys at the top level and no "
        f"{' / '.join(repr(c) for c in _CONTAINERS)} entry holding them"
    )


def matches(sd: Mapping[str, Any]) -> bool:
    keys = _strip(sd)
    return all(k in keys for k in _SIGNATURE)


def weights_only(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without the entries that are not weights (freqs_cis, KV-cache buffers)."""
    return {k: v for k, v in _strip(sd).items() if not _NOT_WEIGHTS.match(k)}


def block_size_from_name(path: str | Path | None) -> int | None:
    """Image tokens per sample of an official file named c2i_<size>_<px>.pt (px / 16, squared), else None."""
    if path is None:
        return None
    m = _PIXELS.search(Path(path).name)
    if not m or int(m.group(1)) % 16:
        return None
    return (int(m.group(1)) // 16) ** 2


def _sizes(sd: Mapping[str, Any]) -> tuple[int, int, int]:
    """(vocabulary, width, layer count) of a LlamaGen GPT state dict, or a UserError for another format."""
    if not matches(sd):
        raise UserError("these weights are not a LlamaGen GPT state dict (no tok_embeddings / cls_embedding / layers.0.attention.wqkv)")
    vocab, dim = _shape(sd["tok_embeddings.weight"])
    n_layer = 0
    while f"layers.{n_layer}.attention.wqkv.weight" in sd:
        n_layer += 1
    return vocab, dim, n_layer


def to_config(sd: Mapping[str, Any], block_size: int | None = None, n_head: int | None = None) -> LlamaGenConfig:
    """The model size from the tensor shapes (real, meta or shape-only entries).

    The head count is not in the shapes; it comes from the official size table by (dim, n_layer), or from
    `n_head` for other sizes. The training-time settings (dropouts) are the official defaults.
    """
    sd = weights_only(sd)
    vocab, dim, n_layer = _sizes(sd)
    if n_head is None:
        known = {(d, n): h for n, h, d in SIZES.values()}
        if (dim, n_layer) not in known:
            raise UserError(f"a LlamaGen GPT with dim {dim} and {n_layer} layers is not an official size "
                            f"({', '.join(SIZES)}); its head count is not in the weights: pass it with --heads N")
        n_head = known[(dim, n_layer)]
    if dim % n_head:
        raise UserError(f"{n_head} heads do not divide the width {dim} of this LlamaGen GPT")
    head_dim = dim // n_head
    qkv_rows = _shape(sd["layers.0.attention.wqkv.weight"])[0]
    n_kv_head = (qkv_rows // head_dim - n_head) // 2
    if n_kv_head < 1 or (n_head + 2 * n_kv_head) * head_dim != qkv_rows:
        raise UserError(f"layers.0.attention.wqkv.weight has {qkv_rows} rows, which fits no head layout of {n_head} heads of {head_dim}")
    hidden = _shape(sd["layers.0.feed_forward.w1.weight"])[0]
    cfg = LlamaGenConfig(
        dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=None if n_kv_head == n_head else n_kv_head,
        vocab_size=vocab, num_classes=_shape(sd["cls_embedding.embedding_table.weight"])[0] - 1,
        block_size=block_size or 256,
    )
    if cfg.ffn_hidden != hidden:
        for multiple_of in (256, 128, 64, 32):  # the official multiple first
            cfg.multiple_of = multiple_of
            if cfg.ffn_hidden == hidden:
                break
        else:
            raise UserError(f"the SwiGLU hidden size {hidden} is not the LlamaGen rule for dim {dim} "
                            "(find_multiple(int(8 * dim / 3), multiple_of))")
    return cfg


def expected_shapes(cfg: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """Every official key with its shape, in the official state-dict order."""
    D, H, hd = cfg.dim, cfg.ffn_hidden, cfg.head_dim
    layer = {
        "attention.wqkv.weight": ((cfg.n_head + 2 * cfg.kv_heads) * hd, D),
        "attention.wo.weight": (D, D),
        "feed_forward.w1.weight": (H, D),
        "feed_forward.w3.weight": (H, D),
        "feed_forward.w2.weight": (D, H),
        "attention_norm.weight": (D,),
        "ffn_norm.weight": (D,),
    }
    assert tuple(layer) == _LAYER_KEYS
    shapes: dict[str, tuple[int, ...]] = {
        "cls_embedding.embedding_table.weight": (cfg.num_classes + 1, D),
        "tok_embeddings.weight": (cfg.vocab_size, D),
    }
    for i in range(cfg.n_layer):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"norm.weight": (D,), "output.weight": (cfg.vocab_size, D)})
    return shapes


def shapes_from_weights(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every official key with the shape the file's own sizes imply (dim, layers, vocabulary, classes, FFN and
    q/k/v widths read from the first layer), in the official order. It needs no head count: that only splits
    the q/k/v rows, which the attention reads at run time."""
    vocab, D, n_layer = _sizes(sd)
    for key in ("layers.0.feed_forward.w1.weight", "cls_embedding.embedding_table.weight"):
        if key not in sd:
            raise UserError(f"LlamaGen weights are missing {key}; the file is incomplete")
    qkv = _shape(sd["layers.0.attention.wqkv.weight"])[0]
    H = _shape(sd["layers.0.feed_forward.w1.weight"])[0]
    layer = {
        "attention.wqkv.weight": (qkv, D), "attention.wo.weight": (D, D),
        "feed_forward.w1.weight": (H, D), "feed_forward.w3.weight": (H, D), "feed_forward.w2.weight": (D, H),
        "attention_norm.weight": (D,), "ffn_norm.weight": (D,),
    }
    shapes = {"cls_embedding.embedding_table.weight": (_shape(sd["cls_embedding.embedding_table.weight"])[0], D),
              "tok_embeddings.weight": (vocab, D)}
    for i in range(n_layer):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"norm.weight": (D,), "output.weight": (vocab, D)})
    return shapes


def check_shapes(sd: Mapping[str, Any], wanted: dict[str, tuple[int, ...]]) -> None:
    """Every wanted key is present with its shape and every entry of `sd` is used (shapes only)."""
    check_exact_keys(sd, wanted, "LlamaGen", "is this a c2i LlamaGen GPT?")


def convert(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Official checkpoint or state dict -> vqtok LlamaGen state dict (same names, official order), every key
    used and every shape consistent with the file's sizes."""
    sd = weights_only(unwrap(sd))
    wanted = shapes_from_weights(sd)
    check_shapes(sd, wanted)
    return {k: sd[k] for k in wanted}


def load_official(sd: Mapping[str, Any], block_size: int | None = None, n_head: int | None = None) -> tuple[LlamaGenConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of an official checkpoint: `convert`, and the config read from the shapes, whose
    own key table must be the file's."""
    state = convert(sd)
    cfg = to_config(state, block_size, n_head)
    check_shapes(state, expected_shapes(cfg))
    return cfg, state


def save_converted(sd: Mapping[str, Any], out_dir: str | Path, tokenizer: dict | None = None,
                   source: str | Path | None = None, block_size: int | None = None, n_head: int | None = None) -> Path:
    """Write a vqtok generator checkpoint directory from an official LlamaGen checkpoint or state dict.

    The token count is `block_size`, else read from the official file name `source` (c2i_B_384.pt: 576),
    else 256. `n_head` is needed only for sizes outside the official table. `tokenizer` is the identity of the tokenizer the weights were trained on; by default the
    released models' VQ-16 when the vocabulary is its 16384 codes.
    """
    from vqtok.ar.checkpoint import save_generator

    named = block_size_from_name(source)
    if block_size:
        how = "given"
    elif named:
        block_size, how = named, f"from the file name {Path(source).name}"
    else:
        how = "default (256 tokens: a 256-px model)"
    cfg, state = load_official(sd, block_size=block_size, n_head=n_head)
    if tokenizer is None:
        tokenizer = {"vocab_size": cfg.vocab_size, "tokens_per_image": cfg.block_size}
        if cfg.vocab_size == OFFICIAL_TOKENIZER["vocab_size"]:
            side = cfg.grid_size
            tokenizer = {**OFFICIAL_TOKENIZER, "scales": [[side, side]], "tokens_per_image": cfg.block_size,
                         "resolution": 16 * side}
    extra = {"source": "official LlamaGen c2i GPT weights (FoundationVision/LlamaGen)", "token_count": how}
    return save_generator(out_dir, state, cfg, tokenizer, extra)


def check_vocabulary(cfg: LlamaGenConfig, tokenizer_vocab: int, tokens_per_image: int | None = None) -> None:
    """Refuse a tokenizer whose codes or token count differ from the generator's, in one line."""
    if tokenizer_vocab != cfg.vocab_size:
        raise UserError(f"the LlamaGen generator predicts {cfg.vocab_size} codes but the tokenizer has {tokenizer_vocab}; "
                        "use the tokenizer it was trained on")
    if tokens_per_image is not None and tokens_per_image != cfg.block_size:
        raise UserError(f"the LlamaGen generator makes {cfg.block_size} tokens per image but the tokenizer uses "
                        f"{tokens_per_image}; use the tokenizer (and image size) it was trained on")
