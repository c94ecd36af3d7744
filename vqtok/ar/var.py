"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al. 2024), in one file.

A decoder-only transformer over a multi-scale token pyramid. Each *scale* k is a pn_k x pn_k token map of
the multi-scale residual tokenizer (vqtok.tokenizer.quantizers.multiscale); the model predicts a whole
scale at once from the class and every coarser scale. It reproduces FoundationVision/VAR `models/var.py`
with `models/basic_var.py`: the state-dict keys, their order and every shape are the official ones, so the
released `var_d16.pth` ... `var_d30.pth` load unchanged (vqtok/interop/var_gpt.py).

Sequence layout for K scales, L = sum pn_k^2 positions, scale k at positions begin_k .. end_k:

    position:  0 (scale 0, pn_0 = 1)        begin_k .. end_k (k >= 1)
    input:     class_emb(c) + pos_start     word_embed(area_down(f_hat_{k-1}, pn_k))     (f_hat: below)
    plus:      lvl_embed(k) + pos_1LC[position], at every position
    target:    the codes of scale k (position p predicts token p of the multi-scale layout)

f_hat_{k-1} = sum_{j<k} Phi_j(bicubic_up(E[codes_j])) is the tokenizer's cumulative reconstruction after
scale k-1 (E its codebook, Phi its residual convs); the model holds no copy of either and reads them from
the bound quantizer (`bind_quantizer`), as VAR keeps its VQVAE outside its module tree.

Attention is block-causal: a position sees its own scale and every coarser one (the persistent buffer
`attn_bias_for_masking`). Blocks are adaLN: the class embedding gives six modulations per block in the
order (gamma1, gamma2, scale1, scale2, shift1, shift2); LayerNorms have no affine parameters (eps 1e-6);
the FFN uses the tanh GELU. With `attn_l2_norm` q and k are l2-normalised per head, q is multiplied by
exp(min(scale_mul_1H11, ln 100)) and the softmax scale is 1; keys get the persistent `zero_k_bias`.
`shared_aln` replaces every block's adaLN Linear by one shared Linear plus a per-block offset `ada_gss`.

Label dropout (a documented choice, as the official): `forward` replaces class c by the null class
`num_classes` where `torch.rand(B) < class_dropout` (the official `cond_drop_rate`), one draw of B uniforms
from the global generator, whenever `class_dropout > 0` -- in eval mode too, exactly like the official forward.
Pass
`drop_labels=False` for an evaluation loss without dropout (or set the rate to 0).

Generation runs one *step per scale* through the one sampling loop (vqtok.ar.sampling.sample) with one of
the decoders below: VARCachedDecoder (a KV cache of the coarser scales, preallocated for all L positions,
no mask within the scale) or VARFullRecompute (the masked forward over the whole prefix each step; the
reference the cached path is tested against).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqtok.ar.kv_cache import KVCache
from vqtok.ar.sampling import HeadMix, attention_dtype, cache_fits
from vqtok.errors import UserError

# VAR's schedule for 256 px images with a 16x downsampling tokenizer (10 scales, 680 tokens)
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MAX_SCALE_MUL = math.log(100.0)  # the clamp on the l2-normalised attention's per-head multiplier


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096  # the tokenizer's codebook size V
    codebook_dim: int = 32  # the tokenizer's code dimension Cvae
    patch_nums: list[int] = field(default_factory=lambda: list(VAR_PATCH_NUMS))
    drop_rate: float = 0.0  # after the attention projection and the FFN
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 at block 0 to this at the last
    norm_eps: float = 1e-6
    shared_aln: bool = False
    class_dropout: float = 0.1  # the official cond_drop_rate: label -> null class in `forward` (train and eval)
    attn_l2_norm: bool = True
    grad_checkpointing: bool = False
    # the initialisation a fresh model gets (`init_weights`; the release's training commands set --alng)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02

    def __post_init__(self):
        self.patch_nums = [int(p) for p in self.patch_nums]
        for name in ("depth", "embed_dim", "num_heads", "num_classes", "vocab_size", "codebook_dim"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"VAR config {name} must be a positive integer, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"VAR embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not self.patch_nums or min(self.patch_nums) < 1:
            raise UserError(f"VAR patch_nums must be positive scale sides, got {self.patch_nums}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            raise UserError("VAR mlp_ratio and norm_eps must be positive")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"VAR config {name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "VARConfig":
        """The released models' rule (`build_vae_var`): width 64 * depth, depth heads, drop path 0.1 * depth / 24,
        l2-normalised attention, no shared adaLN, label dropout 0.1."""
        kwargs = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                      attn_l2_norm=True, shared_aln=False, class_dropout=0.1)
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def seq_len(self) -> int:  # L: tokens per image over all scales
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    def identity_fields(self) -> dict:
        """What a checkpoint's generator.json records about this config."""
        return {"preset": preset_for(self), "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "num_classes": self.num_classes, "patch_nums": list(self.patch_nums),
                "codebook_dim": self.codebook_dim}


# the released sizes (`build_vae_var` with V=4096, Cvae=32 and VAR's 10 scales) and a CPU-sized one
PRESETS = {f"var-d{d}": (lambda d=d: VARConfig.from_depth(d)) for d in (16, 20, 24, 30)}
PRESETS["var-tiny"] = lambda: VARConfig(depth=2, embed_dim=64, num_heads=2, vocab_size=64, codebook_dim=8,
                                        patch_nums=[1, 2, 3, 4], drop_path_rate=0.0)


def preset_for(cfg: VARConfig) -> str | None:
    """The preset whose architecture `cfg` has (ignoring dropout settings), or None."""
    arch = ("depth", "embed_dim", "num_heads", "mlp_ratio", "num_classes", "vocab_size", "codebook_dim",
            "patch_nums", "shared_aln", "attn_l2_norm")
    for name, make in PRESETS.items():
        ref = make()
        if all(getattr(ref, k) == getattr(cfg, k) for k in arch):
            return name
    return None


# ------------------------------------------------------------------------------------------ blocks


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's whole branch with probability p, scale the kept ones by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class SelfAttention(nn.Module):
    """Multi-head attention with q/v biases, the `zero_k_bias` buffer and (optionally) l2-normalised q, k."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, cfg.head_dim
        self.l2_norm = cfg.attn_l2_norm
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.attn_drop = cfg.attn_drop_rate
        self.proj_drop = cfg.drop_rate

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
        if cache is not None:  # this scale's queries see it and every cached coarser scale: no mask
            k, v = cache.update(layer, k, v)
        p = self.attn_drop if self.training else 0.0
        dt = attention_dtype(q.device, q.dtype)  # q is float32 after the l2 scale; k and v may be bf16
        if attn_bias is not None:
            attn_bias = attn_bias.to(dt)
        out = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), attn_mask=attn_bias, dropout_p=p,
                                             scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B, L, C))
        return F.dropout(out, self.proj_drop, self.training) if self.proj_drop > 0 else out


class FFN(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.embed_dim)
        self.drop = cfg.drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.requires_grad:
            h = self.act(h)
        else:  # inference: in place, no second (rows, 4C) buffer to allocate and fault in
            torch.ops.aten.gelu_(h, approximate="tanh")
        out = self.fc2(h)
        return F.dropout(out, self.drop, self.training) if self.drop > 0 else out


class AdaLNSelfAttn(nn.Module):
    """x + attn(LN(x)(1 + scale1) + shift1) gamma1, then the same with the FFN and (scale2, shift2, gamma2)."""

    def __init__(self, cfg: VARConfig, drop_path_p: float):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.shared_aln, self.drop_path_p, self.eps = C, cfg.shared_aln, drop_path_p, cfg.norm_eps
        if cfg.shared_aln:  # the per-block offset added to the shared modulation
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg)
        if not cfg.shared_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C) modulations from the class embedding (B, C), or from the shared adaLN output
        (B, 1, 6, C) with `shared_aln`."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.C,), eps=self.eps)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, attn_bias: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.attn(self._ln(x).mul(scale1.add(1)).add_(shift1), attn_bias, cache, layer).mul_(gamma1)
        x = x + drop_path(h, self.drop_path_p, self.training)
        h = self.ffn(self._ln(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x + drop_path(h, self.drop_path_p, self.training)


class AdaLNBeforeHead(nn.Module):
    """Non-affine LayerNorm modulated by the class: chunks (scale, shift)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.C, self.eps = cfg.embed_dim, cfg.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.embed_dim, 2 * cfg.embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        return self.ada_lin(cond).view(-1, 1, 2, self.C)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        scale, shift = mod.unbind(2)
        return F.layer_norm(x, (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)


# ------------------------------------------------------------------------------------------- model


class VAR(nn.Module):
    """The next-scale transformer. Module and buffer names are VAR's, so its checkpoints load with strict=True."""

    def __init__(self, config: VARConfig | None = None, quantizer: nn.Module | None = None, **kwargs):
        super().__init__()
        self.config = cfg = config if config is not None else VARConfig(**kwargs)
        C, L, K = cfg.embed_dim, cfg.seq_len, len(cfg.patch_nums)
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.codebook_dim, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, cfg.first_l, C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(K, C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg, rates[i]) for i in range(cfg.depth)])
        level = torch.cat([torch.full((p * p,), k) for k, p in enumerate(cfg.patch_nums)]).view(1, L, 1)
        self.register_buffer("lvl_1L", level[:, :, 0].contiguous())
        # 0 where the query's scale >= the key's scale, -inf elsewhere: block-causal over scales
        mask = torch.where(level >= level.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)
        self._quantizer: tuple = ()
        self.init_weights(cfg.init_adaln, cfg.init_adaln_gamma, cfg.init_head)
        if quantizer is not None:
            self.bind_quantizer(quantizer)

    # ------------------------------------------------------------------ tokenizer

    def bind_quantizer(self, quantizer: nn.Module) -> "VAR":
        """Use this multi-scale quantizer's codebook and Phi. It is not part of this module's state dict and
        not moved by `.to()` (as VAR keeps its VQVAE outside its module tree): keep it on the model's device."""
        check_quantizer(self.config, quantizer)
        self._quantizer = (quantizer,)
        return self

    @property
    def quantizer(self) -> nn.Module:
        if not self._quantizer:
            raise UserError("this VAR generator has no tokenizer bound; it needs the multi-scale tokenizer it was "
                            "trained with (its codebook and Phi build the next scale's input)")
        return self._quantizer[0]

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The released models' initialisation (`build_vae_var`: init_weights(0.5, 1e-5, 0.02, -1)):
        truncated normal Linear/Embedding weights (std sqrt(1/(3C)) when init_std < 0), zero biases, a small
        head and adaLN, the gates near zero, and the residual projections divided by sqrt(2 depth)."""
        C = self.config.embed_dim
        std = math.sqrt(1 / C / 3) if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            scale = math.sqrt(2 * self.config.depth)
            for block in self.blocks:
                block.attn.proj.weight.div_(scale)
                block.ffn.fc2.weight.div_(scale)
                if block.shared_aln:
                    block.ada_gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    block.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                    block.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)
                    block.ada_lin[-1].bias.zero_()

    # ------------------------------------------------------------------ the sampling loop's interface

    def condition_ids(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Raw class ids (B,) -> the class-embedding rows they use (the ids themselves), checked."""
        class_ids = class_ids.long()
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) >= self.config.num_classes):
            raise UserError(f"class ids must be in [0, {self.config.num_classes}), got {class_ids.tolist()}")
        return class_ids

    def null_condition_ids(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.config.null_class_id, dtype=torch.long, device=device)

    def generation_steps(self) -> list[int]:
        """Tokens per step: one whole scale (pn^2 tokens) per step."""
        return [p * p for p in self.config.patch_nums]

    def generation_order(self, name: str | None = None) -> None:
        """None: the scales concatenated coarse to fine, each row-major, is both generation and output order."""
        if name not in (None, "", "scales", "next-scale"):
            raise UserError(f"VAR generates scale by scale (coarse to fine); scan order '{name}' does not apply")
        return None

    def default_decoder(self, kv_cache: bool = True):
        return VARCachedDecoder(self) if kv_cache else VARFullRecompute(self)

    def graph_decoder(self, batch: int, guided: bool):
        """The CUDA-graph decoder of a run of `batch` samples per call (one graph per scale after the first)."""
        from vqtok.ar.var_graphs import VARCUDAGraphDecoder

        return VARCUDAGraphDecoder(self, batch, guided)

    # ------------------------------------------------------------------ pieces shared by all paths

    def conditions(self, cond_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(class embedding (R, C), per-block modulations [(R, 1, 6, C)], head modulation (R, 1, 2, C))."""
        cond = self.class_emb(cond_ids)
        shared = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else cond
        return cond, [b.modulation(shared) for b in self.blocks], self.head_nm.modulation(cond)

    def level_position(self, begin: int, end: int) -> torch.Tensor:
        """lvl_embed(level) + pos_1LC for positions begin..end: (1, end - begin, C)."""
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def first_scale_input(self, cond: torch.Tensor) -> torch.Tensor:
        """(R, first_l, C): class embedding + pos_start + level/position embedding of scale 0."""
        R, n = cond.shape[0], self.config.first_l
        return cond.unsqueeze(1).expand(R, n, -1) + self.pos_start.expand(R, n, -1) + self.level_position(0, n)

    def embed_scale(self, f_scale: torch.Tensor, scale: int) -> torch.Tensor:
        """(R, Cvae, pn_k, pn_k) downsampled f_hat -> the input tokens of scale k (R, pn_k^2, C)."""
        begin, end = self.config.begin_ends[scale]
        tokens = f_scale.flatten(2).transpose(1, 2)
        return self.word_embed(tokens.to(self.word_embed.weight.dtype)) + self.level_position(begin, end)

    def _blocks(self, x: torch.Tensor, mods: list[torch.Tensor], attn_bias: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.config.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, mods[i], attn_bias, use_reentrant=False)
            else:
                x = block(x, mods[i], attn_bias, cache, i)
        return x

    def _logits(self, x: torch.Tensor, head_mod: torch.Tensor, mix: HeadMix | None = None) -> torch.Tensor:
        """Logits of the last block's output; with `mix` the guided logits of the doubled batch (the head
        over the mixed rows)."""
        a = self.head_nm(x.float(), head_mod.float()).float()
        return self.head(mix(a) if mix is not None else a).float()

    # ------------------------------------------------------------------ teacher-forced forward

    def drop_classes(self, class_ids: torch.Tensor) -> torch.Tensor:
        """The official label dropout: the null class where torch.rand(B) < class_dropout (global generator)."""
        rate = self.config.class_dropout
        if rate <= 0:
            return class_ids
        drop = torch.rand(class_ids.shape[0], device=class_ids.device) < rate
        return torch.where(drop, self.config.null_class_id, class_ids)

    def forward(self, class_ids: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, drop_labels: bool | None = None
                ) -> torch.Tensor:
        """Logits (B, L', V) of the teacher-forced model, L' = first_l + x.shape[1] (a prefix of whole scales).

        `x_BLCv_wo_first_l` (B, L' - first_l, Cvae) is the tokenizer's teacher-forcing input
        (`teacher_forcing_input`). `drop_labels`: None = the official rule (drop when class_dropout > 0,
        in train and eval mode); False never drops; True drops at class_dropout.
        """
        if drop_labels is None or drop_labels:
            class_ids = self.drop_classes(class_ids)
        return self.prefix_logits(class_ids, x_BLCv_wo_first_l)

    def prefix_logits(self, cond_ids: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """The masked forward for condition rows `cond_ids` (no label dropout) over a prefix of whole scales."""
        cfg = self.config
        ed = cfg.first_l + x_BLCv_wo_first_l.shape[1]
        if ed not in [e for _, e in cfg.begin_ends] or x_BLCv_wo_first_l.shape[-1] != cfg.codebook_dim:
            raise UserError(f"VAR input must be (batch, tokens, {cfg.codebook_dim}) ending on a scale boundary "
                            f"(one of {[e - cfg.first_l for _, e in cfg.begin_ends]} tokens), "
                            f"got {tuple(x_BLCv_wo_first_l.shape)}")
        device_type = x_BLCv_wo_first_l.device.type
        # the embeddings in fp32, as the official forward (autocast off); meta tensors (plans) have no autocast
        fp32 = contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)
        with fp32:
            cond, mods, head_mod = self.conditions(cond_ids)
            sos = cond.unsqueeze(1).expand(-1, cfg.first_l, -1) + self.pos_start.expand(cond.shape[0], -1, -1)
            x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
            x = x + self.level_position(0, ed)
        x = self._blocks(x, mods, self.attn_bias_for_masking[:, :, :ed, :ed])
        return self._logits(x, head_mod)

    def teacher_forcing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Multi-scale tokens (B, L) -> the forward's input (B, L - first_l, Cvae), from the bound quantizer."""
        quant = self.quantizer
        return quant.teacher_forcing_input(quant.split_scales(tokens)).to(self.word_embed.weight.dtype)

    def loss_on_tokens(self, class_ids: torch.Tensor, tokens: torch.Tensor, drop_labels: bool | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of multi-scale tokens (B, L): VAR's training objective (`var_loss`)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.config.seq_len:
            raise UserError(f"VAR needs multi-scale tokens of {self.config.seq_len} per image, got {tuple(tokens.shape)}")
        logits = self(class_ids, self.teacher_forcing_input(tokens), drop_labels=drop_labels)
        return var_loss(logits, tokens), logits


def var_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """VAR's trainer loss: per-token cross-entropy weighted 1/L, summed over tokens, averaged over the batch."""
    B, L, V = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), label_smoothing=label_smoothing,
                         reduction="none").view(B, L)
    return ce.mul(1.0 / L).sum(dim=-1).mean()


def token_fields(vocab_size: int, scales: list[list[int]], tokens_per_view: int) -> dict:
    """The config values that multi-scale token shards decide: the vocabulary and the scale schedule.
    UserError for shards VAR cannot train on (one token grid, or non-square scales)."""
    if len(scales) < 2:
        raise UserError("VAR trains on multi-scale tokens, but these token shards hold one token grid; encode "
                        "them with a multi-scale (msvq) tokenizer")
    sides = []
    for scale in scales:
        h, w = (int(v) for v in scale)
        if h != w:
            raise UserError(f"VAR needs square scales; the token shards have a {h}x{w} scale")
        sides.append(h)
    if sum(s * s for s in sides) != int(tokens_per_view):
        raise UserError(f"the token shards' scales {sides} make {sum(s * s for s in sides)} tokens, "
                        f"not the {tokens_per_view} they hold per image")
    return {"vocab_size": int(vocab_size), "patch_nums": sides}


def train_loss(model: VAR, tokens: torch.Tensor, cond_ids: torch.Tensor, orders=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, token accuracy) of one micro-batch: `cond_ids` already carry the step's class dropout (the
    trainer draws it), so the forward does not drop again. VAR trains in its one fixed order (`orders` unused)."""
    loss, logits = model.loss_on_tokens(cond_ids, tokens, drop_labels=False)
    accuracy = (logits.detach().argmax(dim=-1) == tokens).float().mean()
    return loss, accuracy


def check_quantizer(cfg: VARConfig, quantizer: nn.Module) -> None:
    """UserError unless `quantizer` is a multi-scale quantizer with this generator's vocabulary, code
    dimension and scale schedule."""
    scales = getattr(quantizer, "scales", None)
    if scales is None or not hasattr(quantizer, "next_scale_input"):
        raise UserError("VAR needs a multi-scale tokenizer (msvq quantizer); this tokenizer is single-scale")
    sides = []
    for h, w in scales:
        if h != w:
            raise UserError(f"VAR needs square scales; the tokenizer has a {h}x{w} scale")
        sides.append(int(h))
    if int(quantizer.codebook_size) != cfg.vocab_size:
        raise UserError(f"the tokenizer has {quantizer.codebook_size} codes but this VAR generator predicts "
                        f"{cfg.vocab_size}")
    if int(quantizer.dim) != cfg.codebook_dim:
        raise UserError(f"the tokenizer's codes have {quantizer.dim} channels but this VAR generator embeds "
                        f"{cfg.codebook_dim}")
    if sides != list(cfg.patch_nums):
        raise UserError(f"the tokenizer's scales {sides} differ from this VAR generator's patch_nums "
                        f"{list(cfg.patch_nums)}")


# ---------------------------------------------------------------------------------------- decoders


class VARCachedDecoder:
    """One step per scale over a preallocated KV cache (allocated once per row count, reused across batches).

    `start` embeds the condition rows, computes every block's modulation once for the batch, and runs
    scale 0; `step(tokens of scale k-1, k)` adds those codes' residual to the decoder's f_hat (the
    tokenizer's codebook, bicubic upsampling and Phi), builds scale k's input from f_hat area-downsampled
    to its size, and runs scale k's tokens only, attending to themselves and the cached coarser scales.
    `f_hat` (R, Cvae, pn_K, pn_K) after the last `step` holds every scale but the last.

    With a HeadMix (CFG, `guides_before_head`) the rows are [conditional; null] sharing their tokens: `step`
    takes the B drawn token rows, keeps f_hat for those B rows only and feeds the same scale input to both
    halves (as the official sampler repeats it), and the logits are the guided ones of the B rows.
    """

    guides_before_head = True

    def __init__(self, model: VAR):
        self.model = model
        self.cache: KVCache | None = None

    def _new_cache(self, rows: int, device, dtype) -> KVCache:
        cfg = self.model.config
        return KVCache(cfg.depth, rows, cfg.num_heads, cfg.seq_len, cfg.head_dim, device, dtype)

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None = None, mix: HeadMix | None = None
              ) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        quant = model.quantizer
        if not cache_fits(self.cache, cond_ids.shape[0], cond_ids.device, model.head.weight.dtype):
            dtype = attention_dtype(cond_ids.device, model.head.weight.dtype)
            self.cache = self._new_cache(cond_ids.shape[0], cond_ids.device, dtype)
        self.cache.length = 0
        cond, self.mods, self.head_mod = model.conditions(cond_ids)
        side = cfg.patch_nums[-1]
        rows = cond_ids.shape[0] // 2 if mix is not None else cond_ids.shape[0]
        self.f_hat = torch.zeros(rows, quant.dim, side, side, device=cond_ids.device)
        return self._run(model.first_scale_input(cond), mix)

    def _run(self, x: torch.Tensor, mix: HeadMix | None) -> torch.Tensor:
        x = self.model._blocks(x, self.mods, None, self.cache)
        self.cache.length += x.shape[1]
        return self.model._logits(x, self.head_mod, mix)

    def step(self, tokens: torch.Tensor, step: int, mix: HeadMix | None = None) -> torch.Tensor:
        if tokens.shape[0] != self.f_hat.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows for a decoder of {self.f_hat.shape[0]} "
                             f"({'drawn rows under CFG' if mix is not None else 'all rows'})")
        self.f_hat, nxt = self.model.quantizer.next_scale_input(self.f_hat, tokens, step - 1)
        x = self.model.embed_scale(nxt, step)
        return self._run(torch.cat([x, x]) if mix is not None else x, mix)


class VARFullRecompute:
    """The reference: the masked teacher-forced forward over every scale so far, at every step."""

    def __init__(self, model: VAR):
        self.model = model

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        side = model.config.patch_nums[-1]
        self.cond_ids = cond_ids
        self.f_hat = torch.zeros(cond_ids.shape[0], model.quantizer.dim, side, side, device=cond_ids.device)
        self.inputs = torch.zeros(cond_ids.shape[0], 0, model.config.codebook_dim, device=cond_ids.device)
        return model.prefix_logits(cond_ids, self.inputs)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        model = self.model
        self.f_hat, nxt = model.quantizer.next_scale_input(self.f_hat, tokens, step - 1)
        self.inputs = torch.cat([self.inputs, nxt.flatten(2).transpose(1, 2)], dim=1)
        begin, end = model.config.begin_ends[step]
        return model.prefix_logits(self.cond_ids, self.inputs)[:, begin:end]


__all__ = [
    "PRESETS", "VAR", "VARConfig", "VARCachedDecoder", "VARFullRecompute", "VAR_PATCH_NUMS",
    "check_quantizer", "preset_for", "token_fields", "train_loss", "var_loss",
]
