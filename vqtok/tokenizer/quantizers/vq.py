"""Classic vector quantization: nearest codebook row, straight-through gradient.

Covers the taming/MaskGIT VQGAN quantizer (squared L2, beta 0.25 on the codebook term), LlamaGen's
(l2-normalised "cosine" codes, beta on the commitment term) and the usual training aids: low-dim
factorized codes with projections (ViT-VQGAN), EMA codebook updates with Laplace smoothing, k-means
init on the first batch and restarting dead codes from batch vectors.

The codebook is `self.embedding = nn.Embedding(K, D)`, so official state dicts (`quantize.embedding.weight`)
load unchanged. With `l2_norm` the stored rows are NOT unit-norm; they are normalised at every use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.errors import ConfigError
from vqtok.tokenizer.quantizers.base import Quantizer, QuantizerOutput, fp32_no_autocast, usage_stats
from vqtok.tokenizer.quantizers.distributed import all_reduce_sum_, broadcast_

# Rows of the (tokens x codes) distance matrix computed at once, so 16k tokens x 16k codes stays small.
_DISTANCE_BLOCK_ELEMENTS = 1 << 24


@dataclass
class VQConfig:
    codebook_size: int = 1024
    dim: int = 256                       # channels of the encoder output z
    codebook_dim: int | None = None      # < dim: factorized low-dim codes behind Linear projections
    l2_norm: bool = False                # LlamaGen: normalise z and codebook at every use
    beta: float = 0.25
    # Which term beta scales: "commitment" (VQ-VAE paper, LlamaGen) or "codebook" (taming legacy=True, MaskGIT).
    beta_on: Literal["commitment", "codebook"] = "commitment"
    ema: bool = False                    # codebook follows EMA of assigned vectors instead of gradients
    ema_decay: float = 0.99
    ema_eps: float = 1e-5                # Laplace smoothing of the cluster sizes
    kmeans_init: bool = False            # first training batch seeds the codebook by k-means
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.0     # restart codes whose EMA cluster size falls below this (0 = off)
    entropy_weight: float = 0.0          # LlamaGen's entropy_loss_ratio (sample minus batch entropy)
    entropy_temperature: float = 0.01
    usage_buffer: int = 0                # LlamaGen `codebook_used` window length (65536 for its checkpoints)

    def __post_init__(self) -> None:
        if self.codebook_size < 1 or self.dim < 1:
            raise ConfigError(f"vq codebook_size and dim must be positive, got {self.codebook_size} and {self.dim}")
        if self.codebook_dim is not None and not 1 <= self.codebook_dim:
            raise ConfigError(f"vq codebook_dim must be positive or null, got {self.codebook_dim}")
        if self.beta_on not in ("commitment", "codebook"):
            raise ConfigError(f"vq beta_on must be 'commitment' or 'codebook', got '{self.beta_on}'")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"vq ema_decay must lie strictly between 0 and 1, got {self.ema_decay}")
        if self.dead_code_threshold < 0 or self.usage_buffer < 0 or self.kmeans_iters < 0:
            raise ConfigError("vq dead_code_threshold, usage_buffer and kmeans_iters must not be negative")


def squared_distances(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """|z|^2 + |e|^2 - 2 z.e for every (token, code) pair, the form the anchors use."""
    return torch.addmm(
        z_flat.square().sum(1, keepdim=True) + codebook.square().sum(1)[None], z_flat, codebook.t(), alpha=-2.0
    )


@torch.no_grad()
def nearest_code(z_flat: torch.Tensor, codebook: torch.Tensor, l2_norm: bool = False) -> torch.Tensor:
    """Index of the nearest codebook row for each row of `z_flat` (N, D), by squared L2 in float32.

    With `l2_norm` both sides are l2-normalised first (nearest by cosine). Rows are processed in blocks
    so the N x K distance matrix never exists in one piece.
    """
    with fp32_no_autocast(z_flat.device.type):
        z_flat, codebook = z_flat.float(), codebook.float()
        if l2_norm:
            z_flat, codebook = F.normalize(z_flat, dim=-1), F.normalize(codebook, dim=-1)
        # |z|^2 is the same for every code of a row, so the argmin only needs |e|^2 - 2 z.e (one pass less)
        e_sq = codebook.square().sum(1)[None]
        block = max(1, _DISTANCE_BLOCK_ELEMENTS // max(1, codebook.shape[0]))
        out = [
            torch.addmm(e_sq, z_flat[i:i + block], codebook.t(), alpha=-2.0).argmin(1)
            for i in range(0, z_flat.shape[0], block)
        ]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z_flat.device)


def entropy_regularizer(affinity: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token entropy minus entropy of the mean distribution (LlamaGen/MAGVIT form)."""
    logits = affinity / temperature
    probs = logits.softmax(-1)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    return sample_entropy - (-(avg * torch.log(avg + 1e-5)).sum())


def kmeans_plus_plus_seeds(samples: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding: each new seed drawn with probability proportional to its squared distance
    from the seeds so far, which avoids the split-one-cluster local minima of uniform seeding."""
    n = samples.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=samples.device)
    chosen[0] = torch.randint(0, n, (1,), device=samples.device)
    min_d2 = (samples - samples[chosen[0]]).square().sum(1)
    for i in range(1, k):
        # once every sample is a seed (fewer samples than codes) the rest are drawn uniformly
        weights = min_d2 if bool(min_d2.sum() > 0) else torch.ones_like(min_d2)
        chosen[i] = torch.multinomial(weights, 1)
        min_d2 = torch.minimum(min_d2, (samples - samples[chosen[i]]).square().sum(1))
    return samples[chosen].clone()


def kmeans(samples: torch.Tensor, k: int, iters: int, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from k-means++ seeds; returns (means (k, D), cluster sizes (k,))."""
    means = kmeans_plus_plus_seeds(samples, k)
    bins = torch.zeros(k, device=samples.device)
    for _ in range(max(1, iters)):
        idx = nearest_code(samples, means, l2_norm=cosine)
        bins = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(means).index_add_(0, idx, samples)
        new = sums / bins.clamp_min(1)[:, None]
        if cosine:
            new = F.normalize(new, dim=-1)
        means = torch.where(bins[:, None] > 0, new, means)  # empty clusters keep their old mean
    return means, bins


class VectorQuantizer(Quantizer):
    """z (B, C, H, W) -> (z_q, indices (B, H, W), aux). See the module docstring and `VQConfig`."""

    def __init__(self, config: VQConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else VQConfig(**kwargs)
        self.codebook_size, self.dim = cfg.codebook_size, cfg.dim
        code_dim = cfg.codebook_dim or cfg.dim
        self.project_in = nn.Linear(cfg.dim, code_dim) if code_dim != cfg.dim else None
        self.project_out = nn.Linear(code_dim, cfg.dim) if code_dim != cfg.dim else None
        self.embedding = nn.Embedding(cfg.codebook_size, code_dim)
        # taming / LlamaGen init; LlamaGen also normalises it once when l2_norm is on.
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if cfg.ema:
            self.embedding.weight.requires_grad_(False)  # moved by EMA, not by the optimizer
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if cfg.ema or cfg.dead_code_threshold > 0:
            self.register_buffer("ema_cluster_size", torch.ones(cfg.codebook_size))
        if cfg.kmeans_init:
            self.register_buffer("initialized", torch.tensor(False))
        if cfg.usage_buffer:
            self.register_buffer("codebook_used", torch.zeros(cfg.usage_buffer))

    # ------------------------------------------------------------------ lookups

    def codebook(self) -> torch.Tensor:
        """The codebook as used for search and lookup (normalised rows under `l2_norm`), float32."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.config.l2_norm else w

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, C, H, W) in z's space; any other shape (...) -> (..., C)."""
        self.check_indices(indices)
        with fp32_no_autocast(indices.device.type):
            codes = F.embedding(indices.long(), self.codebook())
            if self.project_out is not None:
                codes = self.project_out(codes)
        return codes.permute(0, 3, 1, 2).contiguous() if indices.ndim == 3 else codes

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, H, W), got {tuple(z.shape)}")
        B, C, H, W = z.shape
        cfg = self.config
        with fp32_no_autocast(z.device.type):
            z_e = z.float().permute(0, 2, 3, 1).reshape(-1, C)
            if self.project_in is not None:
                z_e = self.project_in(z_e)
            if cfg.l2_norm:
                z_e = F.normalize(z_e, dim=-1)
            if self.training and cfg.kmeans_init and not bool(self.initialized):
                self._kmeans_init(z_e.detach())
            codebook = self.codebook()
            # search on already-normalised vectors: normalising twice would perturb the last bits
            indices = nearest_code(z_e.detach(), codebook.detach(), l2_norm=False)
            z_q = F.embedding(indices, codebook)

            codebook_loss = F.mse_loss(z_q, z_e.detach())
            commitment_loss = F.mse_loss(z_e, z_q.detach())
            if cfg.ema:  # the codebook is not learned by gradient, so only the commitment term remains
                loss = cfg.beta * commitment_loss
            elif cfg.beta_on == "commitment":
                loss = codebook_loss + cfg.beta * commitment_loss
            else:
                loss = commitment_loss + cfg.beta * codebook_loss
            aux = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss}
            if cfg.entropy_weight > 0:
                affinity = -squared_distances(z_e, codebook)
                aux["entropy_loss"] = entropy_regularizer(affinity, cfg.entropy_temperature)
                loss = loss + cfg.entropy_weight * aux["entropy_loss"]

            if self.training:
                self._update_codebook(z_e.detach(), indices)

            z_q_st = z_e + (z_q - z_e).detach()  # straight-through: forward z_q, backward identity
            if self.project_out is not None:
                z_q_st = self.project_out(z_q_st)
            z_q_st = z_q_st.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous().to(z.dtype)

        aux["loss"] = loss
        aux.update(usage_stats(indices, cfg.codebook_size))
        if "codebook_used" in self._buffers:
            aux["window_usage"] = self._update_usage_window(indices)
        return QuantizerOutput(z_q_st, indices.view(B, H, W), aux)

    # ------------------------------------------------------------------ training-time codebook care

    @torch.no_grad()
    def _kmeans_init(self, z_e: torch.Tensor) -> None:
        means, bins = kmeans(z_e, self.codebook_size, self.config.kmeans_iters, cosine=self.config.l2_norm)
        broadcast_(means), broadcast_(bins)  # every rank starts from rank 0's codebook
        self.embedding.weight.data.copy_(means)
        if self.config.ema:
            # keep sum and size consistent, else the first EMA step collapses codes (vq-pytorch #66)
            self.ema_embed_sum.copy_(means * bins[:, None])
        if "ema_cluster_size" in self._buffers:
            self.ema_cluster_size.copy_(bins)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, z_e: torch.Tensor, indices: torch.Tensor) -> None:
        cfg = self.config
        if "ema_cluster_size" not in self._buffers:
            return
        counts = all_reduce_sum_(torch.bincount(indices, minlength=cfg.codebook_size).float())
        self.ema_cluster_size.lerp_(counts, 1 - cfg.ema_decay)
        if cfg.ema:
            sums = all_reduce_sum_(torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_e))
            self.ema_embed_sum.lerp_(sums, 1 - cfg.ema_decay)
            total = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + cfg.ema_eps) / (total + cfg.codebook_size * cfg.ema_eps) * total
            self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed[:, None])
        if cfg.dead_code_threshold > 0:
            self._restart_dead_codes(z_e)

    @torch.no_grad()
    def _restart_dead_codes(self, z_e: torch.Tensor) -> None:
        threshold = self.config.dead_code_threshold
        dead = self.ema_cluster_size < threshold
        n_dead = int(dead.sum())
        if n_dead == 0 or z_e.shape[0] == 0:
            return
        pick = torch.randint(0, z_e.shape[0], (n_dead,), device=z_e.device)
        weight = self.embedding.weight.data
        weight[dead] = z_e[pick].to(weight.dtype)
        self.ema_cluster_size[dead] = threshold
        if self.config.ema:
            self.ema_embed_sum[dead] = z_e[pick] * threshold
            broadcast_(self.ema_embed_sum)
        broadcast_(weight), broadcast_(self.ema_cluster_size)  # rank 0's picks win everywhere

    @torch.no_grad()
    def _update_usage_window(self, indices: torch.Tensor) -> torch.Tensor:
        """LlamaGen's per-rank sliding window of recent indices; returns the fraction of codes in it."""
        window = self.codebook_used
        if self.training:
            new = indices[-window.numel():].float()
            window.copy_(torch.cat([window[new.numel():], new]))
        return torch.tensor(torch.unique(window).numel() / self.codebook_size)


__all__ = ["VQConfig", "VectorQuantizer", "nearest_code", "squared_distances", "kmeans", "kmeans_plus_plus_seeds", "entropy_regularizer"]
