"""LlamaGen: the class-conditional raster GPT of Sun et al. 2024 ("Autoregressive Model Beats Diffusion"), in one file.

A Llama-style decoder (RMSNorm, SwiGLU, 2D rotary embeddings, no biases) over image tokens in raster order,
with the state-dict keys of the official FoundationVision/LlamaGen GPT (its c2i `Transformer`), so released
`c2i_*.pt` weights load unchanged (vqtok/interop/llamagen_gpt.py) and compute the same numbers
(tests/conformance_llamagen_gpt.py checks the conformance fixture).

Sequence layout for N image tokens x_0 .. x_{N-1} on a g x g grid (N = g^2):

    slot:    0          1       2       ...  N-1
    input:   class emb  x_0     x_1     ...  x_{N-2}      (the last token is never fed back)
    rope:    zeros      grid 0  grid 1  ...  grid N-2     (slot 1 + t carries token t's grid position)
    predict: x_0        x_1     x_2     ...  x_{N-1}

The class slot's rotation is all zeros (cos = sin = 0, the official table's first row), so its query and key
are zero vectors, not unrotated ones. Each head splits its head_dim/2 rotation pairs in two: the first half
rotate by the token's grid row, the second half by its column, with frequencies base^(-2j / (head_dim/2)),
j < head_dim/4. The pairs are adjacent elements (2i, 2i+1).

Class dropout (for classifier-free guidance) replaces a label by the null class `num_classes` where
`torch.rand(B) < class_dropout_prob`, in training only, as the first draw of the forward. The class table
always has num_classes + 1 rows (the official one drops the null row only when class_dropout_prob is 0, which
no released model does).

Decoding keeps a KV cache preallocated at its full length (class slot + N - 1 tokens) and filled by
position, so every buffer a decode step touches has a fixed address (what CUDA graphs need). The decoders
the sampling loop drives (cached, static-buffer and the full-recompute reference) are at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqtok.ar.few_rows import linear_few_rows
from vqtok.ar.kv_cache import KVCache
from vqtok.ar.sampling import HeadMix, StaticHeadMix, attention_dtype, cache_fits, load_mix
from vqtok.errors import ConfigError, UserError


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class LlamaGenConfig:
    """The official `ModelArgs` of a c2i model (same names), without the text-to-image fields."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many key/value heads as query heads
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = 16384  # image codes of the tokenizer
    block_size: int = 256  # image tokens per sample (a square grid: 256 at 256 px, 576 at 384 px)
    num_classes: int = 1000
    cls_token_num: int = 1
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "multiple_of", "vocab_size", "block_size", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"LlamaGen config {name} must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.n_head:
            raise ConfigError(f"LlamaGen dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ConfigError(f"LlamaGen head_dim {self.head_dim} (dim / n_head) must be a multiple of 4 for the 2D rotary embedding")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError(f"LlamaGen n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.cls_token_num != 1:
            raise ConfigError(f"LlamaGen c2i models embed one class token; cls_token_num {self.cls_token_num} is not supported")
        side = math.isqrt(self.block_size)
        if side * side != self.block_size:
            raise ConfigError(f"LlamaGen block_size {self.block_size} is not a square token grid")
        for name in ("class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"LlamaGen config {name} must be in [0, 1), got {getattr(self, name)}")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            raise ConfigError("LlamaGen norm_eps and rope_base must be > 0")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ConfigError(f"LlamaGen ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def seq_len(self) -> int:  # image tokens per sample
        return self.block_size

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.grid_size, self.grid_size

    @property
    def null_class_id(self) -> int:  # class table row of the "no class" condition (CFG)
        return self.num_classes

    @property
    def class_dropout(self) -> float:  # the name the training task reads for every family
        return self.class_dropout_prob

    @property
    def cache_len(self) -> int:  # class slot + the N - 1 tokens that are fed back
        return self.cls_token_num + self.block_size - 1

    def identity_fields(self) -> dict:
        """What a checkpoint's generator.json records about this config."""
        return {"preset": preset_for(self), "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "num_classes": self.num_classes, "order": "raster"}


# The official size table (GPT-B ... GPT-7B); the c2i releases are B, L, XL, XXL and 3B.
SIZES: dict[str, tuple[int, int, int]] = {  # name -> (n_layer, n_head, dim)
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "XXXL": (48, 40, 2560),
    "1B": (22, 32, 2048),
    "3B": (24, 32, 3200),
    "7B": (32, 32, 4096),
}


def size_config(size: str, **overrides) -> LlamaGenConfig:
    """The official GPT-<size> config (c2i defaults: 16384 codes, 256 tokens, 1000 classes) with overrides."""
    key = size.upper().removeprefix("GPT-")
    if key not in SIZES:
        raise ConfigError(f"unknown LlamaGen size '{size}'; choose one of {', '.join(SIZES)}")
    n_layer, n_head, dim = SIZES[key]
    return LlamaGenConfig(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, **overrides})


# Named sizes for recipes (`model.preset`): the official ones, and a CPU-sized one (the fixture's shape)
PRESETS: dict[str, Callable[[], LlamaGenConfig]] = {
    **{f"llamagen-{name.lower()}": (lambda name=name: size_config(name)) for name in ("B", "L", "XL", "XXL", "3B")},
    "llamagen-tiny": lambda: LlamaGenConfig(dim=64, n_layer=2, n_head=2, vocab_size=512, block_size=64, num_classes=1000),
}


def token_fields(vocab_size: int, scales: list[list[int]], tokens_per_view: int) -> dict:
    """The config values token shards decide: the vocabulary and the (square) token count."""
    h, w = (int(v) for v in scales[0])
    if h != w:
        raise UserError(f"LlamaGen generates a square token grid, but the token shards hold {h}x{w} tokens")
    return {"vocab_size": int(vocab_size), "block_size": int(tokens_per_view)}


def train_loss(model: "LlamaGen", tokens: torch.Tensor, cond_ids: torch.Tensor, orders: torch.Tensor | None = None):
    """(mean cross-entropy, next-token accuracy) of one teacher-forced micro-batch; tokens (B, N) raster order,
    cond_ids (B,) class table rows (the training task has already dropped some to the null class). LlamaGen
    trains in raster order only, so `orders` must be None or raster."""
    if orders is not None and not torch.equal(orders, torch.arange(tokens.shape[1], device=orders.device).expand_as(orders)):
        raise UserError("LlamaGen trains in raster order only; it has no permutation annealing")
    logits = model.forward_conditions(tokens, cond_ids)
    return loss(logits, tokens), (logits.argmax(dim=-1) == tokens).float().mean()


def preset_for(cfg: LlamaGenConfig) -> str | None:
    """`llamagen-<size>` when the architecture is an official size at the c2i defaults (any token count), else None."""
    for name, (n_layer, n_head, dim) in SIZES.items():
        if (cfg.n_layer, cfg.n_head, cfg.dim, cfg.kv_heads, cfg.ffn_hidden, cfg.vocab_size, cfg.num_classes) == (
                n_layer, n_head, dim, n_head, size_config(name).ffn_hidden, 16384, 1000):
            return f"llamagen-{name.lower()}"
    return None


# ------------------------------------------------------------------------------------------ layers


def rope_table(cfg: LlamaGenConfig, device=None) -> torch.Tensor:
    """(cls_token_num + N, head_dim/2, 2) float32 (cos, sin) per slot: zeros for the class slot, then the
    raster grid positions, each pair's angle from the row (first half of the pairs) or the column."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))
    g = cfg.grid_size
    angles = torch.outer(torch.arange(g, device=device, dtype=torch.float32), freqs)  # (g, half/2)
    grid = torch.cat([angles[:, None, :].expand(g, g, -1), angles[None, :, :].expand(g, g, -1)], dim=-1)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # (N, half, 2)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, 2, device=device), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x (B, T, H, hd) by rope (T, hd/2, 2), in float32."""
    return rotate_pairs(x, rope_factors(rope))


def rope_factors(rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) table (T, hd/2, 2) as the two factors `rotate_pairs` multiplies by, (T, 1, hd/2, 2)
    each: (cos, cos) for the pair as it is and (-sin, sin) for the pair swapped. Computed once per forward."""
    cos, sin = rope.unsqueeze(1).unbind(-1)
    return torch.stack([cos, cos], dim=-1), torch.stack([-sin, sin], dim=-1)


def rotate_pairs(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) per pair of x (B, T, H, hd), in float32, as
    x * (cos, cos) + swap(x) * (-sin, sin): each output is one product plus one (negated) product, the
    same rounding as the formula."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    out = xs * factors[0] + xs.flip(-1) * factors[1]
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LabelEmbedding(nn.Module):
    """The class table (`cls_embedding.embedding_table`), with the null class as its last row."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, cond_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(cond_ids)[:, None]  # (B, 1, D)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query per head, q (B, H, 1, hd), over cache slices k, v (B, KVH, L, hd).

    Query head h reads key/value head h // (H / KVH) (grouped-query attention as `repeat_interleave`). The
    G = H / KVH query heads of a group become G query rows of one batched matmul against that group's
    contiguous (L, hd) key block, so neither the strided cache slice nor the repeated keys are copied.
    """
    B, H, _, hd = q.shape
    KVH, L = k.shape[1], k.shape[2]
    q = q.reshape(B * KVH, H // KVH, hd) * (1.0 / math.sqrt(hd))
    scores = torch.bmm(q, k.flatten(0, 1).transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(scores, v.flatten(0, 1)).view(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None, layer: int = 0,
                start: int = 0) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        kv = cfg.kv_heads * cfg.head_dim
        qk, v = self.wqkv(x).split([cfg.dim + kv, kv], dim=-1)
        # q and k heads side by side: one rotation for both (the same per-element arithmetic)
        qk = rotate_pairs(qk.view(B, T, cfg.n_head + cfg.kv_heads, cfg.head_dim), rope).transpose(1, 2)
        q, k = qk.split([cfg.n_head, cfg.kv_heads], dim=1)
        v = v.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        if cache is not None and T == 1:
            out = one_query_attention(q, k, v)
        else:
            if cfg.kv_heads != cfg.n_head:
                k = k.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
                v = v.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
            if cache is not None and start:  # a block of new slots after cached ones
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                p = cfg.attn_dropout_p if self.training else 0.0
                out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
        out = self.wo(out.transpose(1, 2).reshape(B, T, cfg.dim))
        return F.dropout(out, cfg.resid_dropout_p, self.training) if cfg.resid_dropout_p else out


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.p = cfg.ffn_dropout_p
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return F.dropout(out, self.p, self.training) if self.p else out


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p, scale the kept ones by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig, drop_path_p: float):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None, layer: int = 0,
                start: int = 0) -> torch.Tensor:
        h = x + drop_path(self.attention(self.attention_norm(x), rope, cache, layer, start), self.drop_path_p, self.training)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path_p, self.training)


# ------------------------------------------------------------------------------------------- model


class LlamaGen(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedding(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # linearly increasing stochastic depth over the layers (torch.linspace(0, rate, n_layer) as the official)
        rates = [cfg.drop_path_rate * i / (cfg.n_layer - 1) if cfg.n_layer > 1 else 0.0 for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, rates[i]) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # not in the state dict (the official keeps it as a plain attribute); kept float32 by _apply
        self.register_buffer("rope", rope_table(cfg), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: N(0, 0.02) linear and embedding weights, RMSNorm weights 1, a zero output layer."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # a dtype cast (model.half()) must not round the rotation table: rebuild it in float32 where it now lives
        if self.rope.dtype != torch.float32:
            self.rope = rope_table(self.config, device=self.rope.device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------- conditions
    def condition_ids(self, class_ids: torch.Tensor, drop_prob: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw class ids (B,) -> class table rows (the same ids); with probability `drop_prob` the null row.

        The drop is `torch.rand(B) < drop_prob` on the ids' device (the official label dropout draw)."""
        cfg = self.config
        class_ids = class_ids.long()
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) >= cfg.num_classes):
            bad = class_ids[(class_ids < 0) | (class_ids >= cfg.num_classes)][0].item()
            raise UserError(f"class id {bad} is outside this generator's {cfg.num_classes} classes (0..{cfg.num_classes - 1})")
        if drop_prob > 0:
            device = "cpu" if generator is not None else class_ids.device
            drop = torch.rand(class_ids.shape[0], device=device, generator=generator).to(class_ids.device) < drop_prob
            class_ids = torch.where(drop, cfg.null_class_id, class_ids)
        return class_ids

    def null_condition_ids(self, batch: int, device=None) -> torch.Tensor:
        return torch.full((batch,), self.config.null_class_id, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ the sampling loop's interface
    def generation_steps(self) -> list[int]:
        """One token per step."""
        return [1] * self.config.block_size

    def generation_order(self, name: str | None = None) -> None:
        """None: LlamaGen generates in raster order, which is its output order (no other order is trained)."""
        if name not in (None, "raster", "row-major"):
            raise UserError(f"LlamaGen generates in raster order only; scan order '{name}' is for RAR")
        return None

    def default_decoder(self, kv_cache: bool = True):
        return CachedDecoder(self) if kv_cache else FullRecompute(self)

    def graph_decoder(self, batch: int, guided: bool) -> "CUDAGraphDecoder":
        """The CUDA-graph decoder of a run of `batch` samples per call (with CFG: 2 * batch rows)."""
        return CUDAGraphDecoder(self, batch, guided)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass: tokens (B, N) raster order, class_ids (B,) -> logits (B, N, V), slot j predicting
        tokens[:, j]. In training, labels are dropped to the null class with `class_dropout_prob`."""
        drop = self.config.class_dropout_prob if self.training else 0.0
        return self.forward_conditions(tokens, self.condition_ids(class_ids, drop))

    def forward_conditions(self, tokens: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        """`forward` with class table rows (a class or the null class) instead of raw class ids."""
        if tokens.dim() != 2 or tokens.shape[1] != self.config.block_size:
            raise UserError(f"got tokens of shape {tuple(tokens.shape)} but this generator expects (batch, {self.config.block_size})")
        return self.prefix_logits(tokens[:, :-1], cond_ids)

    def prefix_logits(self, prefix: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, t+1, V) of [class, prefix (B, t)] without a cache; the last predicts token t."""
        cfg = self.config
        if prefix.shape[1] > cfg.block_size - 1:
            raise UserError(f"a prefix of {prefix.shape[1]} tokens is longer than {cfg.block_size - 1}")
        h = torch.cat([self.cls_embedding(cond_ids), self.tok_embeddings(prefix)], dim=1)
        if cfg.token_dropout_p:
            h = F.dropout(h, cfg.token_dropout_p, self.training)
        rope = rope_factors(self.rope[: h.shape[1]])
        for layer in self.layers:
            if cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, use_reentrant=False)
            else:
                h = layer(h, rope)
        return self.output(self.norm(h)).float()

    # --------------------------------------------------------------------------- cached decoding
    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        device = torch.device(device or self.output.weight.device)
        if dtype is None:  # keys/values are stored in the dtype the attention computes in
            dtype = attention_dtype(device, self.output.weight.dtype)
        cfg = self.config  # zero-filled, as the official LlamaGen cache starts
        return KVCache(cfg.n_layer, batch, cfg.kv_heads, cfg.cache_len, cfg.head_dim, device, dtype, zeroed=True)

    def _decode(self, h: torch.Tensor, start: int, cache: KVCache, mix: HeadMix | None = None) -> torch.Tensor:
        rope = rope_factors(self.rope[start:start + h.shape[1]])
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i, start)
        h = self.norm(h[:, -1:])
        return linear_few_rows(mix(h) if mix is not None else h, self.output).float()

    def prefill(self, cond_ids: torch.Tensor, cache: KVCache, mix: HeadMix | None = None) -> torch.Tensor:
        """Write the class slot (R,) into the cache; logits for token 0, (R, 1, V) (with `mix`: the guided
        logits of the R / 2 [conditional; null] row pairs, the head run on the mixed rows)."""
        return self._decode(self.cls_embedding(cond_ids), 0, cache, mix)

    def decode_step(self, token: torch.Tensor, step: int, cache: KVCache, mix: HeadMix | None = None) -> torch.Tensor:
        """Feed token step-1 (R, 1) at slot cls + step - 1; logits for token `step`, (R, 1, V) (with `mix`:
        (R / 2, 1, V) as `prefill`).

        Nothing here synchronises with the host or allocates by data-dependent shape (CUDA-graph safe)."""
        return self._decode(self.tok_embeddings(token), self.config.cls_token_num + step - 1, cache, mix)


def loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of teacher-forced logits (B, N, V) against the tokens (B, N)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))


# ---------------------------------------------------------------------------------------- decoders


class CachedDecoder:
    """Eager KV-cached decoding; the cache is allocated once per row count and reused across batches.

    With a HeadMix (CFG, `guides_before_head`) `step` takes the B drawn tokens, feeds each to its
    conditional and its null row, and returns the guided logits (B, 1, V) of the head run on the mixed rows
    (on the conditional rows alone past the guidance interval)."""

    guides_before_head = True

    def __init__(self, model: LlamaGen):
        self.model = model
        self.cache: KVCache | None = None

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None = None, mix: HeadMix | None = None
              ) -> torch.Tensor:
        if not cache_fits(self.cache, cond_ids.shape[0], cond_ids.device, self.model.output.weight.dtype):
            self.cache = self.model.new_cache(cond_ids.shape[0], device=cond_ids.device)
        return self.model.prefill(cond_ids, self.cache, mix)

    def step(self, tokens: torch.Tensor, step: int, mix: HeadMix | None = None) -> torch.Tensor:
        tokens = tokens.reshape(-1, 1)
        if mix is not None:
            tokens = torch.cat([tokens, tokens])
        if tokens.shape[0] != self.cache.rows:
            raise ValueError(f"{tokens.shape[0]} token rows for a decoder of {self.cache.rows} rows")
        return self.model.decode_step(tokens, step, self.cache, mix)


class FullRecompute:
    """The reference: re-run the whole prefix every step (O(N^2) work over a sample)."""

    def __init__(self, model: LlamaGen):
        self.model = model

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        self.cond_ids = cond_ids
        self.tokens = cond_ids.new_empty(cond_ids.shape[0], 0)
        return self.model.prefix_logits(self.tokens, cond_ids)[:, -1:]

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens.view(-1, 1).to(self.tokens.device)], dim=1)
        return self.model.prefix_logits(self.tokens, self.cond_ids)[:, -1:]


class StaticDecoder:
    """KV-cached decoding of a fixed batch in which every tensor a decode step reads or writes lives at a
    fixed address: the condition ids, the fed-back token, the cache, the guidance setting and the logits.
    `start` refills the conditions and prefills eagerly; `step` copies the token in and runs `_run(step)`,
    whose work a CUDA graph can record per step. On its own (any device) it runs eagerly, so the static
    layout is tested on CPU. With CFG (`guided`) it runs 2 * batch rows (conditional, then null) and, like
    the eager CachedDecoder, mixes them before the head (a StaticHeadMix: the scale of each step is a buffer
    value), so `step` takes the batch's B drawn tokens and both give the same guided logits (B, 1, V)."""

    def __init__(self, model: LlamaGen, batch: int, guided: bool):
        self.model, self.batch, self.guided = model, batch, guided
        self.guides_before_head = guided
        rows = self.rows = 2 * batch if guided else batch
        device = model.output.weight.device
        self.cond_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.cache = model.new_cache(rows, device=device)
        self.mix = StaticHeadMix(device) if guided else None
        self.logits = torch.zeros(batch, 1, model.config.vocab_size, device=device)

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None = None, mix: HeadMix | None = None) -> torch.Tensor:
        if cond_ids.shape != (self.rows,):
            raise ValueError(f"this static decoder runs {self.rows} rows, got conditions {tuple(cond_ids.shape)}")
        load_mix(self.mix, mix)
        self.cond_ids.copy_(cond_ids)
        self.logits.copy_(self.model.prefill(self.cond_ids, self.cache, self.mix))
        return self.logits

    def _run(self, step: int) -> torch.Tensor:
        self.logits.copy_(self.model.decode_step(self.token, step, self.cache, self.mix))
        return self.logits

    def _feed(self, tokens: torch.Tensor, mix: HeadMix | None) -> None:
        """Copy the B drawn tokens into the token buffer (into both halves under CFG) and the mix setting."""
        if tokens.numel() != self.batch:
            raise ValueError(f"{tokens.numel()} tokens for a static decoder of batch {self.batch}")
        load_mix(self.mix, mix)
        tokens = tokens.reshape(-1, 1)
        if self.guided:
            self.token[:self.batch].copy_(tokens)
            self.token[self.batch:].copy_(tokens)
        else:
            self.token.copy_(tokens)

    def step(self, tokens: torch.Tensor, step: int, mix: HeadMix | None = None) -> torch.Tensor:
        self._feed(tokens, mix)
        return self._run(step)


class CUDAGraphDecoder(StaticDecoder):
    """StaticDecoder whose decode steps replay CUDA graphs captured at construction (`vqtok sample
    --cuda-graphs`): one graph per decode step 1..N-1 (the attention length differs per step), all in one
    memory pool. That is safe because the graphs replay one at a time in capture order and each copies its
    result into the one static logits buffer. The prefill runs eagerly into the same static cache.

    Capture follows PyTorch's CUDA-graph rules: warm-up steps on a side stream first, inputs refilled with
    `copy_` before each replay, nothing that synchronises with the host inside a step, and autocast with
    its weight-cast cache off. Build it under the autocast setting the sampling will use.
    """

    def __init__(self, model: LlamaGen, batch: int, guided: bool):
        from vqtok.ar.cuda_graphs import capture_static_steps, require_cuda

        device = model.output.weight.device
        require_cuda(device)
        super().__init__(model, batch, guided)
        capture_static_steps(self, device, lambda mix: StaticDecoder.start(self, self.cond_ids.clone(), mix=mix),
                             model.config.block_size)

    def step(self, tokens: torch.Tensor, step: int, mix: HeadMix | None = None) -> torch.Tensor:
        self._feed(tokens, mix)
        self.graphs[step - 1].replay()  # decode step `step`: reads token, mix and cache, writes cache and logits
        return self.logits
