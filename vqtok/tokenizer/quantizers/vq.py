"""Classic vector quantization: nearest codebook row, straight-through gradient.

Covers the taming/MaskGIT VQGAN quantizer (squared L2, beta 0.25 on the codebook term), LlamaGen's
(l2-normalised "cosine" codes, beta on the commitment term) and the usual training aids: low-dim
factorized codes with projections (ViT-VQGAN), EMA codebook updates with Laplace smoothing, k-means
init on the first steps' vectors and restarting dead codes from encoder vectors of all ranks (both applied
by `update_codebook()` once per step, never inside `forward`), SimVQ and the rotation trick.

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
from vqtok.tokenizer.quantizers.base import CodebookUpdate, Quantizer, QuantizerOutput, fp32_no_autocast, usage_stats
from vqtok.distributed import all_reduce_sum_, broadcast_
from vqtok.tokenizer.quantizers.guards import CodebookGuards, RowPool, pick_rows, rotate_to, seeded_generator

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
    ema_decay: float = 0.99              # also the decay of the cluster sizes that find dead codes
    ema_eps: float = 1e-5                # Laplace smoothing of the cluster sizes
    kmeans_init: bool = False            # the first training steps' vectors (all ranks) seed the codebook by k-means
    kmeans_iters: int = 10
    kmeans_init_steps: int = 1           # how many training steps' vectors the k-means sees
    # restart codes whose EMA cluster size (hits per step, all ranks) falls below this (0 = off), from
    # encoder vectors drawn over all ranks; the trainer resets their optimizer moments and weight-EMA rows
    dead_code_threshold: float = 0.0
    entropy_weight: float = 0.0          # LlamaGen's entropy_loss_ratio (sample minus batch entropy)
    entropy_temperature: float = 0.01
    usage_buffer: int = 0                # LlamaGen `codebook_used` window length (65536 for its checkpoints)
    # SimVQ (Zhu et al. 2024): codes = a learned linear map of a frozen random codebook, so every code
    # moves with each update instead of only the ones that were hit
    simvq: bool = False
    # straight-through estimator: "identity" (copy the gradient) or "rotation" (Fifty et al. 2024)
    straight_through: Literal["identity", "rotation"] = "identity"

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
        if self.kmeans_init_steps < 1:
            raise ConfigError(f"vq kmeans_init_steps must be at least 1, got {self.kmeans_init_steps}")
        if self.straight_through not in ("identity", "rotation"):
            raise ConfigError(f"vq straight_through must be 'identity' or 'rotation', got '{self.straight_through}'")
        if self.simvq and self.ema:
            raise ConfigError("vq simvq and ema cannot be combined: SimVQ learns its codebook map by gradient")


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


def entropy_regularizer(affinity: torch.Tensor, temperature: float, sample_term: bool = True) -> torch.Tensor:
    """Mean per-token entropy minus entropy of the mean distribution (LlamaGen/MAGVIT form); with
    `sample_term=False` only minus the entropy of the mean distribution (the batch's code spread)."""
    logits = affinity / temperature
    probs = logits.softmax(-1)
    avg = probs.mean(0)
    minus_marginal_entropy = (avg * torch.log(avg + 1e-5)).sum()
    if not sample_term:
        return minus_marginal_entropy
    return -(probs * logits.log_softmax(-1)).sum(-1).mean() + minus_marginal_entropy


def kmeans_plus_plus_seeds(samples: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding: each new seed drawn with probability proportional to its squared distance
    from the seeds so far, which avoids the split-one-cluster local minima of uniform seeding.
    `samples` must live on the CPU when a (CPU) generator is given."""
    n = samples.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=samples.device)
    chosen[0] = torch.randint(0, n, (1,), generator=generator).to(samples.device)[0]
    min_d2 = (samples - samples[chosen[0]]).square().sum(1)
    for i in range(1, k):
        # once every sample is a seed (fewer samples than codes) the rest are drawn uniformly
        weights = min_d2 if bool(min_d2.sum() > 0) else torch.ones_like(min_d2)
        chosen[i] = torch.multinomial(weights, 1, generator=generator)[0]
        min_d2 = torch.minimum(min_d2, (samples - samples[chosen[i]]).square().sum(1))
    return samples[chosen].clone()


def kmeans(samples: torch.Tensor, k: int, iters: int, cosine: bool,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from k-means++ seeds; returns (means (k, D), cluster sizes (k,))."""
    means = kmeans_plus_plus_seeds(samples, k, generator)
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


class VectorQuantizer(CodebookGuards, Quantizer):
    """z (B, C, H, W) -> (z_q, indices (B, H, W), aux). See the module docstring and `VQConfig`."""

    def __init__(self, config: VQConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else VQConfig(**kwargs)
        self.codebook_size, self.dim = cfg.codebook_size, cfg.dim
        code_dim = cfg.codebook_dim or cfg.dim
        self.project_in = nn.Linear(cfg.dim, code_dim) if code_dim != cfg.dim else None
        self.project_out = nn.Linear(code_dim, cfg.dim) if code_dim != cfg.dim else None
        self.embedding = nn.Embedding(cfg.codebook_size, code_dim)
        if cfg.simvq:
            # SimVQ: a frozen Gaussian basis; only the shared linear map `code_transform` is learned
            nn.init.normal_(self.embedding.weight, std=code_dim ** -0.5)
            self.embedding.weight.requires_grad_(False)
            self.code_transform = nn.Linear(code_dim, code_dim, bias=False)
        else:
            # taming / LlamaGen init; LlamaGen also normalises it once when l2_norm is on.
            nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            self.code_transform = None
        if cfg.l2_norm and not cfg.simvq:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if cfg.ema:
            self.embedding.weight.requires_grad_(False)  # moved by EMA, not by the optimizer
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if cfg.ema or cfg.dead_code_threshold > 0:
            self.register_buffer("ema_cluster_size", torch.ones(cfg.codebook_size))
        if cfg.kmeans_init:
            self.register_buffer("initialized", torch.tensor(False))
        if cfg.kmeans_init or cfg.dead_code_threshold > 0:
            # update count: seeds the restart / k-means choices identically on every rank and on resume
            self.register_buffer("codebook_updates", torch.tensor(0, dtype=torch.long))
        if cfg.usage_buffer:
            self.register_buffer("codebook_used", torch.zeros(cfg.usage_buffer))
        self._pool = RowPool()
        self._kmeans_rows: list[torch.Tensor] = []
        self._pending_sums: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A codebook loaded without its EMA sums (official weights, a run without the EMA codebook) gets
        sums that reproduce it: sum = code x cluster size. Left at their init, the first EMA step would
        pull every code toward the random init rows."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        weight = state_dict.get(prefix + "embedding.weight")
        if self.config.ema and weight is not None and prefix + "ema_embed_sum" not in state_dict:
            with torch.no_grad():
                size = self.ema_cluster_size.to(self.ema_embed_sum.dtype)
                self.ema_embed_sum.copy_(weight.to(self.ema_embed_sum) * size[:, None])

    # ------------------------------------------------------------------ lookups

    def codebook(self) -> torch.Tensor:
        """The codebook as used for search and lookup (normalised rows under `l2_norm`), float32."""
        w = self.embedding.weight.float()
        if self.code_transform is not None:
            w = self.code_transform(w)
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
                self._record(z_e.detach(), indices)

            if cfg.straight_through == "rotation":
                z_q_st = rotate_to(z_e, z_q.detach())
            else:
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
    def _record(self, z_e: torch.Tensor, indices: torch.Tensor) -> None:
        """A training forward's share of the step: histogram, vectors for restarts, EMA sums. Local only."""
        self.record_counts(indices)
        if self._wants_rows:
            self._pool.add(z_e)
        if self.config.ema and not self.codebook_frozen:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_e)
            self._pending_sums = sums if self._pending_sums is None else self._pending_sums + sums

    @torch.no_grad()
    def update_codebook(self, step: int = 0) -> CodebookUpdate:
        """k-means init, EMA codebook and dead-code restarts from this step's training forwards.

        Collective under torch.distributed (all-reduce of the histogram, gather of the vectors): call it on
        every rank once per optimizer step, after the forwards and before the next ones.
        """
        cfg = self.config
        counts = self.take_counts()
        update = CodebookUpdate(counts, row_params=self._row_params())
        if self.codebook_frozen:
            self._pool.clear()
            self._pending_sums = None
            return CodebookUpdate(counts)
        if "codebook_updates" in self._buffers:
            self.codebook_updates += 1
        if cfg.kmeans_init and not bool(self.initialized):
            rows = self._pool.gather().cpu()
            if rows.shape[0]:  # a step without training forwards (anywhere) does not count
                self._kmeans_rows.append(rows)
            self._pending_sums = None
            if len(self._kmeans_rows) >= cfg.kmeans_init_steps:
                update.replaced = self._kmeans_init(torch.cat(self._kmeans_rows), len(self._kmeans_rows))
                self._kmeans_rows = []
            return update
        if "ema_cluster_size" not in self._buffers:
            self._pool.clear()
            return update
        device = self.ema_cluster_size.device
        hits = all_reduce_sum_(counts[0].to(device).float())
        if not bool(hits.sum() > 0):  # no training forward on any rank since the last update
            self._pool.clear()
            self._pending_sums = None
            return update
        self.ema_cluster_size.lerp_(hits, 1 - cfg.ema_decay)
        if cfg.ema:
            sums = self._pending_sums if self._pending_sums is not None else torch.zeros_like(self.ema_embed_sum)
            self._pending_sums = None
            self.ema_embed_sum.lerp_(all_reduce_sum_(sums), 1 - cfg.ema_decay)
            total = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + cfg.ema_eps) / (total + cfg.codebook_size * cfg.ema_eps) * total
            self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed[:, None])
        if cfg.dead_code_threshold > 0:
            update.replaced = self._restart_dead_codes()
        self._pool.clear()
        return update

    def _row_params(self) -> list[nn.Parameter]:
        w = self.embedding.weight
        return [w] if w.requires_grad else []

    def _set_codes(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Make codes `rows` equal `values` (in code space): directly, or through SimVQ's map."""
        weight = self.embedding.weight.data
        values = values.to(weight.device, weight.dtype)
        if self.code_transform is not None:
            # codes = base @ W^T, so the base row that yields `values` is values @ pinv(W^T)
            values = values @ torch.linalg.pinv(self.code_transform.weight.detach().float().t()).to(values.dtype)
        weight[rows] = values

    @torch.no_grad()
    def _kmeans_init(self, samples: torch.Tensor, steps_seen: int = 1) -> torch.Tensor:
        cfg = self.config
        gen = seeded_generator(int(self.codebook_updates))
        means, bins = kmeans(samples.float(), self.codebook_size, cfg.kmeans_iters, cosine=cfg.l2_norm, generator=gen)
        device = self.embedding.weight.device
        means, bins = broadcast_(means.to(device)), broadcast_(bins.to(device))  # bitwise-equal on every rank
        every = torch.ones(self.codebook_size, dtype=torch.bool, device=device)
        self._set_codes(every, means)
        if cfg.ema:
            # keep sum and size consistent, else the first EMA step collapses codes
            self.ema_embed_sum.copy_(means * bins[:, None])
        if "ema_cluster_size" in self._buffers:
            # hits per step, the unit the EMA tracks (the k-means saw kmeans_init_steps steps of vectors)
            self.ema_cluster_size.copy_(bins if cfg.ema else bins / max(1, steps_seen))
        self.initialized.fill_(True)
        return every

    @torch.no_grad()
    def _restart_dead_codes(self) -> torch.Tensor | None:
        threshold = self.config.dead_code_threshold
        found = self._dead_codes_and_pool()
        if found is None:
            return None
        dead, n_dead, pool = found
        new = pick_rows(pool, n_dead, seeded_generator(int(self.codebook_updates)))
        if self.config.l2_norm:
            new = F.normalize(new, dim=-1)
        self._set_codes(dead, new)
        self.ema_cluster_size[dead] = threshold
        if self.config.ema:
            self.ema_embed_sum[dead] = new.to(self.ema_embed_sum.dtype) * threshold
        return dead

    @torch.no_grad()
    def _update_usage_window(self, indices: torch.Tensor) -> torch.Tensor:
        """LlamaGen's per-rank sliding window of recent indices; returns the fraction of codes in it."""
        window = self.codebook_used
        if self.training:
            new = indices[-window.numel():].float()
            window.copy_(torch.cat([window[new.numel():], new]))
        return torch.tensor(torch.unique(window).numel() / self.codebook_size)


__all__ = ["VQConfig", "VectorQuantizer", "nearest_code", "squared_distances", "kmeans", "kmeans_plus_plus_seeds", "entropy_regularizer"]
