"""RAR: the randomized autoregressive image generator (Yu et al. 2024), in one file.

A decoder-only ViT over image tokens with DiT-style adaLN-Zero blocks. It reproduces the official
bytedance/1d-tokenizer `modeling/rar.py` exactly: same state-dict keys and table sizes, so released
weights load unchanged (see vqtok/interop/rar.py), and the same numbers (tests/test_rar_model.py checks
the conformance fixtures).

Sequence layout for N image tokens generated in order `o` (o[j] = raster position of the j-th token):

    slot:   0      1       2         3         ...  N+1
    token:  cls    cond    x[o0]     x[o1]     ...  x[o_{N-1}]
    pos:    P[0]   P[1]    P[2+o0]   P[2+o1]   ...  P[2+o_{N-1}]     (a token keeps its own position)
    target: 0      T[2+o0] T[2+o1]   T[2+o2]   ...  0                (the position it must predict next)
    adaLN:  class embedding + timesteps_embeddings[slot]             (per token)

The output of slot k (k >= 1) predicts x[o_{k-1}]; the cls slot's output is dropped, so `forward`
returns N+1 logits of which the first N are scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqtok.ar.kv_cache import KVCache
from vqtok.ar.orders import scan_order
from vqtok.ar.sampling import attention_dtype
from vqtok.errors import UserError

# Official table sizes: both positional tables have seq_len + 1024 rows and the per-slot adaLN table has
# seq_len + 100 rows; only the first seq_len + 2 rows are ever read, but the shapes are part of the
# checkpoint format, so they are kept.
POS_TABLE_EXTRA = 1024
TIMESTEP_TABLE_EXTRA = 100
PREFIX = 2  # cls slot + condition slot before the image tokens
LN_EPS = 1e-6


@dataclass
class RARConfig:
    hidden_size: int = 768
    depth: int = 24
    num_heads: int = 16
    intermediate_size: int = 3072
    vocab_size: int = 1024  # image codes of the tokenizer
    seq_len: int = 256  # image tokens per sample
    num_classes: int = 1000
    dropout: float = 0.1  # after the attention projection and in the MLP
    attn_dropout: float = 0.1
    class_dropout: float = 0.1  # probability of replacing the class by the null class in training (for CFG)
    grad_checkpointing: bool = False
    order: str = "row-major"  # the scan order the model anneals to in training and generates in
    grid: list[int] | None = None  # token grid (height, width) for the scan order; None: square

    def __post_init__(self):
        for name in ("hidden_size", "depth", "num_heads", "intermediate_size", "vocab_size", "seq_len", "num_classes"):
            if getattr(self, name) < 1:
                raise UserError(f"RAR config {name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"RAR hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("dropout", "attn_dropout", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"RAR config {name} must be in [0, 1), got {getattr(self, name)}")
        from vqtok.ar.orders import canonical_order_name

        self.order = canonical_order_name(self.order)
        if self.grid is not None and (len(self.grid) != 2 or self.grid[0] * self.grid[1] != self.seq_len):
            raise UserError(f"RAR grid {self.grid} must be [height, width] with height*width = seq_len {self.seq_len}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def class_offset(self) -> int:  # embedding row of class 0
        return self.vocab_size + 1

    @property
    def null_class_id(self) -> int:  # embedding row of the "no class" condition used by CFG
        return self.vocab_size + 1 + self.num_classes

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + 1 + self.num_classes + 1

    def identity_fields(self) -> dict:
        """What a checkpoint's generator.json records about this config."""
        from vqtok.ar.presets import preset_for

        return {"preset": preset_for(self), "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "num_classes": self.num_classes, "order": self.order}

    @property
    def grid_shape(self) -> tuple[int, int]:
        if self.grid is not None:
            return int(self.grid[0]), int(self.grid[1])
        side = math.isqrt(self.seq_len)
        if side * side != self.seq_len:
            raise UserError(f"seq_len {self.seq_len} is not a square; set the RAR config grid to [height, width]")
        return side, side


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x * (1 + scale) + shift in one fused kernel: one temporary fewer than the two-op form
    return torch.addcmul(shift, x, 1 + scale)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a single query per head, q (B, H, 1, hd), over cache slices k, v (B, H, L, hd).

    The cache slice k[:, :, :L] is strided (rows are Lmax apart per head), which SDPA's CPU flash kernel
    handles at less than half its speed on contiguous keys (bench/README.md has the times). Each head's
    (L, hd) block is contiguous, and B and H merge into one batch dim without a copy, so two batched
    matmuls and a softmax over (B*H, 1, L) do the same work with no copy of the keys.
    """
    B, H, _, hd = q.shape
    q = q.reshape(B * H, 1, hd) * (1.0 / math.sqrt(hd))
    scores = torch.bmm(q, k.flatten(0, 1).transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(scores, v.flatten(0, 1)).view(B, H, 1, hd)


class _CPUDropout(torch.autograd.Function):
    """Inverted dropout whose mask costs one 32-bit draw of torch's generator per two elements.

    torch's CPU dropout draws a Bernoulli per element (`bernoulli_`, ~6 ns/element here), which made
    dropout 0.1 cost 0.63 vs 0.90 of GEMM peak in training (bench/README.md). Here each element gets 16
    uniform bits (the two halves of a 32-bit draw) and is dropped when they fall below round(p * 2^16),
    so the drop probability is p to within 2^-17 (exact for p = k / 2^16); kept elements are scaled
    by 1 / (1 - p) as nn.Dropout does. The bits come from torch's default generator, so seeding,
    `get_rng_state`/`set_rng_state` and bit-exact resume work as before.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        # [-2^31, 2^31 - 1): one 32-bit draw each (a full 2^32 range would take two); both int16
        # halves are uniform to within 2^-32
        bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_(-2**31, 2**31 - 1)
        drop = bits.view(torch.int16)[:n].view(x.shape) < round(p * 65536) - 32768
        ctx.save_for_backward(drop)
        ctx.scale = 1.0 / (1.0 - p)
        return (x * ctx.scale).masked_fill_(drop, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return (grad * ctx.scale).masked_fill_(drop, 0.0), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":  # GPUs draw Bernoulli masks cheaply (Philox); keep torch's own kernel
        return F.dropout(x, p, True)
    return _CPUDropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout with the cheaper CPU mask of `_CPUDropout` (no parameters: the state dict is unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """Causal softmax attention with dropout on the weights: SDPA's math path, but with `dropout`'s mask.

    SDPA's CPU flash kernel does not take dropout, so with dropout > 0 torch runs this same math path
    with a `bernoulli_` mask over (B, H, T, T); the mask here is the cheaper one.
    """
    T = q.shape[-2]
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    weights = scores.masked_fill_(future, float("-inf")).softmax(dim=-1)
    return dropout(weights, p, True) @ v


def group_conditions(cond_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(distinct condition ids (U,), row -> distinct index (B,)), or (cond_ids, None) when every row differs.

    Rows with the same condition (every null row of a CFG batch, repeated classes) get identical adaLN
    modulation, and the per-token adaLN Linear(D, 6D) is a third of a decode step's matmul work, so the
    blocks can compute it once per distinct row and gather. Grouped on the integer ids, so it is exact.
    """
    distinct, index = torch.unique(cond_ids, return_inverse=True)
    if distinct.shape[0] == cond_ids.shape[0]:
        return cond_ids, None
    return distinct, index


class RARKVCache(KVCache):
    """vqtok.ar.kv_cache.KVCache over [cls, cond, x_0 ..] that also holds the batch's adaLN conditions, set
    once by `RAR.prefill` from an explicit grouping: `cond` (U, D) distinct condition embeddings and
    `cond_index` (B,) (row b uses cond[cond_index[b]]) or None (row b uses cond[b]). When the shapes stay the
    same, a later prefill refills these buffers in place, so a decoder with static buffers (CUDA graphs)
    always reads the current batch's conditions.
    """

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        super().__init__(depth, batch, heads, max_len, head_dim, device, dtype)
        self.cond: torch.Tensor | None = None
        self.cond_index: torch.Tensor | None = None

    def set_conditions(self, cond: torch.Tensor, index: torch.Tensor | None) -> None:
        """Store the batch's distinct condition embeddings (U, D) and row index (B,) or None; in place when
        the existing buffers have the same shapes."""
        if index is not None and index.shape != (self.rows,):
            raise ValueError(f"condition index has shape {tuple(index.shape)}, expected ({self.rows},)")
        if index is None and cond.shape[0] != self.rows:
            raise ValueError(f"{cond.shape[0]} condition rows for a cache of batch {self.rows} and no index")
        if self.cond is not None and self.cond.shape == cond.shape and self.cond.dtype == cond.dtype:
            self.cond.copy_(cond)
        else:
            self.cond = cond.clone()
        if index is None:
            self.cond_index = None
        elif self.cond_index is not None:
            self.cond_index.copy_(index)
        else:
            self.cond_index = index.clone()


class Attention(nn.Module):
    """Multi-head causal self-attention with per-head LayerNorm on queries and keys."""

    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=LN_EPS)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=LN_EPS)
        self.attn_dropout = cfg.attn_dropout
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.proj_drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        p_drop = self.attn_dropout if self.training else 0.0
        if cache is None and p_drop > 0 and x.device.type == "cpu":
            out = causal_attention_with_dropout(q, k, v, p_drop)
        elif cache is None:
            # a purely causal mask as a flag (not a float mask), so fused kernels can run on CUDA
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
        else:
            start = cache.length
            k, v = cache.update(layer, k, v)
            if T == 1:  # one new token sees the whole prefix
                out = one_query_attention(q, k, v)
            else:  # a block of new tokens (prefill): causal among themselves, full view of the prefix
                rows = torch.arange(start, start + T, device=x.device)[:, None]
                mask = torch.arange(start + T, device=x.device)[None, :] <= rows
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()  # exact erf GELU, as the reference (timm Mlp default)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: (shift, scale, gate) for attention and for the MLP.

    Unlike DiT, norm1/norm2 keep their affine parameters (the reference does).
    """

    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.mlp = MLP(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: RARKVCache | None = None, layer: int = 0,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows` (B,), when given: c holds distinct condition rows and row b of x uses c[rows[b]]."""
        mod = self.adaLN_modulation(c)
        if rows is not None:
            mod = mod.index_select(0, rows)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        # residual + gate * branch fused (addcmul): saves a full-size temporary per branch
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cache, layer))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm modulated by the condition. Chunks (scale, shift): the reverse of DiT's order."""

    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if rows is not None:  # c holds distinct condition rows (see Block.forward)
            mod = mod.index_select(0, rows)
        scale, shift = mod.chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


def ar_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ARLoss: mean cross-entropy of logits[:, :-1] against labels, and argmax accuracy."""
    scored = logits[:, :-1].float()
    loss = F.cross_entropy(scored.reshape(-1, scored.shape[-1]), labels.reshape(-1))
    accuracy = (scored.detach().argmax(dim=-1) == labels).float().mean()
    return loss, accuracy



class RAR(nn.Module):
    loss = staticmethod(ar_loss)  # model.loss(logits, labels) -> (mean CE, accuracy)

    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len + POS_TABLE_EXTRA, D))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len + POS_TABLE_EXTRA, D))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, cfg.seq_len + TIMESTEP_TABLE_EXTRA, D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        # rows: image codes | mask token (unused) | classes | null class; the input and output tables are not tied
        self.embeddings = nn.Embedding(cfg.embedding_rows, D)
        self.adaln_before_head = FinalLayer(cfg)
        self.lm_head = nn.Linear(D, cfg.vocab_size)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, std=0.02)
        nn.init.zeros_(self.cls_token)
        # adaLN-Zero: every block starts as the identity and the head as lm_head(LN(x))
        for modulation in [b.adaLN_modulation for b in self.blocks] + [self.adaln_before_head.adaLN_modulation]:
            nn.init.zeros_(modulation[1].weight)
            nn.init.zeros_(modulation[1].bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------- conditions
    def condition_ids(self, class_ids: torch.Tensor, drop_prob: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw class ids 0..C-1 -> embedding rows (class + vocab + 1); with probability `drop_prob` the null row."""
        cfg = self.config
        class_ids = class_ids.long()
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) >= cfg.num_classes):
            bad = class_ids[(class_ids < 0) | (class_ids >= cfg.num_classes)][0].item()
            raise UserError(f"class id {bad} is outside this generator's {cfg.num_classes} classes (0..{cfg.num_classes - 1})")
        ids = class_ids + cfg.class_offset
        if drop_prob > 0:
            drop = torch.rand(ids.shape, device="cpu" if generator is not None else ids.device, generator=generator)
            ids = torch.where(drop.to(ids.device) < drop_prob, torch.full_like(ids, cfg.null_class_id), ids)
        return ids

    def null_condition_ids(self, batch: int, device=None) -> torch.Tensor:
        return torch.full((batch,), self.config.null_class_id, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ the sampling loop's interface
    def generation_steps(self) -> list[int]:
        """One token per step."""
        return [1] * self.config.seq_len

    def generation_order(self, name: str | None = None) -> torch.Tensor:
        """(N,) raster position of each generated token for scan order `name` (None: the trained order)."""
        return scan_order(name or self.config.order, *self.config.grid_shape)

    def default_decoder(self, kv_cache: bool = True):
        from vqtok.ar.rar_decoding import CachedDecoder, FullRecompute  # the decoders import this module

        return CachedDecoder(self) if kv_cache else FullRecompute(self)

    def graph_decoder(self, batch: int, guided: bool):
        """The CUDA-graph decoder of a run of `batch` samples per call (with CFG: 2 * batch rows), in the
        trained scan order."""
        from vqtok.ar.cuda_graphs import CUDAGraphDecoder  # it imports this module

        return CUDAGraphDecoder(self, batch, guided, self.generation_order())

    # ------------------------------------------------------------------------------------ embedding
    def prefix_embeddings(self, cond_ids: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots 0 (cls) and 1 (condition), (B, 2, D), and the raw condition embedding (B, D) for adaLN."""
        B = cond_ids.shape[0]
        cond = self.embeddings(cond_ids)  # (B, D)
        cls = (self.cls_token + self.pos_embed[:, 0:1]).expand(B, -1, -1)
        # the condition slot predicts the first generated token, so it carries that token's position
        first_target = self.target_aware_pos_embed[0, PREFIX + orders[:, 0]]
        cond_slot = cond + self.pos_embed[0, 1] + first_target
        return torch.cat([cls, cond_slot[:, None]], dim=1), cond

    def token_embeddings(self, tokens: torch.Tensor, start: int, orders: torch.Tensor) -> torch.Tensor:
        """Embeddings of generated tokens number start..start+T-1 (in generation order), i.e. slots 2+start....

        Each token carries its own raster position (pos_embed[2 + o_j]) and the position of the token that
        follows it (target_aware_pos_embed[2 + o_{j+1}]); the last token of the sequence has no target.
        """
        T, N = tokens.shape[1], orders.shape[1]
        own = orders[:, start:start + T]
        x = self.embeddings(tokens) + self.pos_embed[0, PREFIX + own]
        nxt = orders[:, start + 1:start + T + 1]
        target = self.target_aware_pos_embed[0, PREFIX + nxt]
        if nxt.shape[1] < T:  # the block reaches the end of the sequence: the final token predicts nothing
            assert start + T == N
            target = F.pad(target, (0, 0, 0, T - nxt.shape[1]))
        return x + target

    def slot_conditions(self, cond: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Per-token adaLN condition of slots start..end-1: class embedding + timesteps_embeddings[slot]."""
        return cond[:, None] + self.timesteps_embeddings[:, start:end]

    # -------------------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, class_ids: torch.Tensor, orders: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass. tokens (B, N) raster order, class_ids (B,) raw 0..C-1, orders (B, N) or None = raster.

        Returns logits (B, N+1, V) in generation order (slot k predicts labels[:, k]; the last is unused)
        and labels (B, N) = tokens permuted by the order. In training, classes are dropped with
        probability `config.class_dropout` (the null class teaches the unconditional model for CFG).
        """
        drop = self.config.class_dropout if self.training else 0.0
        return self.forward_conditions(tokens, self.condition_ids(class_ids, drop), orders)

    def forward_conditions(self, tokens: torch.Tensor, cond_ids: torch.Tensor, orders: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with condition embedding rows (class + vocab + 1, or the null row) instead of class ids."""
        B, N = tokens.shape
        if N != self.config.seq_len:
            raise UserError(f"got {N} tokens per sample but this generator expects {self.config.seq_len}")
        if orders is None:
            orders = torch.arange(N, device=tokens.device).expand(B, N)
        elif orders.shape != tokens.shape:
            raise UserError(f"orders have shape {tuple(orders.shape)} but tokens {tuple(tokens.shape)}; give one order per sample")
        labels = tokens.gather(1, orders)
        return self.prefix_logits(labels, cond_ids, orders), labels

    def prefix_logits(self, gen_tokens: torch.Tensor, cond_ids: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Logits of every slot but cls for [cls, cond, gen_tokens]; gen_tokens (B, t) are in generation order.

        With t < N this is a full (non-cached) recomputation of a sampling prefix; its last output
        predicts token t. Returns (B, t+1, V).
        """
        x, cond = self.prefix_embeddings(cond_ids, orders)
        t = gen_tokens.shape[1]
        if t:
            x = torch.cat([x, self.token_embeddings(gen_tokens, 0, orders)], dim=1)
        c = self.slot_conditions(cond, 0, PREFIX + t)
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.head(x[:, 1:], c[:, 1:])

    def head(self, x: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        # FinalLayer.forward(x, c) stays callable with two arguments (its interface for the fixture checks)
        return self.lm_head(self.adaln_before_head(x, c) if rows is None else self.adaln_before_head(x, c, rows))

    # --------------------------------------------------------------------------- cached decoding
    def new_cache(self, batch: int, device=None, dtype=None) -> RARKVCache:
        """A KV cache for [cls, cond, x_0 .. x_{N-2}]: the last token is sampled but never fed back."""
        cfg = self.config
        device = torch.device(device or self.lm_head.weight.device)
        if dtype is None:  # keys/values are stored in the dtype the attention computes in
            dtype = attention_dtype(device, self.lm_head.weight.dtype)
        return RARKVCache(cfg.depth, batch, cfg.num_heads, PREFIX + cfg.seq_len - 1, cfg.head_dim, device, dtype)

    def decode_slots(self, x: torch.Tensor, c: torch.Tensor, cache: RARKVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run new slots (B, T, D) through the blocks against the cache; logits of the last slot (B, V).

        With `rows`, c holds distinct condition rows and x's row b uses c[rows[b]] (Block.forward)."""
        for i, block in enumerate(self.blocks):
            x = block(x, c, cache, i, rows)
        cache.length += x.shape[1]
        return self.head(x[:, -1], c[:, -1], rows)

    def prefill(self, cond_ids: torch.Tensor, orders: torch.Tensor, cache: RARKVCache,
                groups: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Process [cls, cond] into the cache (from slot 0); returns the logits for generated token 0 (B, V).

        `groups` = (distinct condition ids (U,), row index (B,) or None) is how the decode steps share adaLN
        modulation between rows (see `group_conditions`, the default); the cache keeps the embeddings of
        the distinct rows for every later `decode_step`.
        """
        distinct, index = group_conditions(cond_ids) if groups is None else groups
        cache.length = 0
        cache.set_conditions(self.embeddings(distinct), index)
        x, cond = self.prefix_embeddings(cond_ids, orders)
        return self.decode_slots(x, self.slot_conditions(cond, 0, PREFIX), cache)

    def decode_step(self, token: torch.Tensor, step: int, orders: torch.Tensor, cache: RARKVCache) -> torch.Tensor:
        """Feed generated token `step-1` (B,) (slot step+1) and return the logits for token `step` (B, V).

        The adaLN conditions are the ones `prefill` stored in the cache. Nothing here synchronises with
        the host or allocates by data-dependent shape, so a step can be captured in a CUDA graph.
        """
        x = self.token_embeddings(token[:, None], step - 1, orders)
        slot = PREFIX + step - 1
        if cache.cond is None:
            raise RuntimeError("decode_step before prefill: the cache holds no conditions")
        c = self.slot_conditions(cache.cond, slot, slot + 1)
        return self.decode_slots(x, c, cache, cache.cond_index)
