"""VAR's multi-scale residual quantizer (FoundationVision/VAR `models/quant.py::VectorQuantizer2`).

One shared codebook quantizes the full-resolution residual at K scales, coarse to fine:

    f_rest = f;  f_hat = 0
    for k, (h, w) in enumerate(patch_nums):
        idx_k = nearest(area_downsample(f_rest, (h, w)))           # last scale: f_rest as is
        r_k   = Phi_k(bicubic_upsample(E[idx_k], (H, W)))          # Phi after the upsample, also at the last scale
        f_hat += r_k;  f_rest -= r_k

Phi(h) = (1 - r) h + r conv3x3(h), r = |quant_resi|. `share_quant_resi` K' convs serve the K scales; scale k
uses the conv whose tick is nearest to k / (K - 1). The table must come from float64 numpy: two scales of
the released 10-scale model are exact ties that float32 or exact arithmetic resolve differently.

Indices of all scales are concatenated coarse-first, each in raster order: (B, sum_k h_k * w_k).
Module and buffer names follow VAR so `quantize.*` of its checkpoints loads with strict=True.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqtok.errors import ConfigError, UserError
from vqtok.tokenizer.quantizers.base import CodebookUpdate, Quantizer, QuantizerOutput, fp32_no_autocast, usage_stats
from vqtok.distributed import all_reduce_sum_, broadcast_
from vqtok.tokenizer.quantizers.guards import CodebookGuards, RowPool, pick_rows, rotate_to, seeded_generator
from vqtok.tokenizer.quantizers.vq import entropy_regularizer, kmeans, nearest_code, squared_distances

PatchNum = int | tuple[int, int]


@dataclass
class MultiScaleVQConfig:
    codebook_size: int = 4096
    dim: int = 32
    patch_nums: tuple[PatchNum, ...] = field(default_factory=lambda: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    beta: float = 0.25
    quant_resi: float = 0.5          # Phi's residual ratio r; |r| <= 1e-6 means no conv (identity)
    share_quant_resi: int = 4        # K' convs: 0 = one per scale, 1 = one shared, else partially shared
    default_qresi_counts: int = 0    # with share_quant_resi=0: number of convs (0 = one per scale)
    using_znorm: bool = False        # nearest code by cosine instead of squared L2
    # Guards against collapse (not in VAR; all off by default so VAR's checkpoints behave as released).
    # The codebook is shared by all scales, so a code counts as dead when the EMA of its hits per step
    # summed over the scales (all ranks) falls below `dead_code_threshold`; replacements
    # are drawn evenly from every scale's residuals (all ranks), so coarse scales get codes near their
    # own residuals. `entropy_weight` adds LlamaGen's entropy term at each scale (mean over scales).
    kmeans_init: bool = False
    kmeans_iters: int = 10
    kmeans_init_steps: int = 1
    dead_code_threshold: float = 0.0
    dead_code_decay: float = 0.9         # EMA decay of the summed hits per step that find dead codes
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    entropy_sample_term: bool = True     # False: only the batch (marginal) entropy of each scale's codes
    straight_through: str = "identity"   # "identity" or "rotation" (Fifty et al. 2024)
    # Per-scale gain of the code search (not in VAR; off by default). Area-downsampled residuals of the
    # middle scales are smaller than the last scale's, so squared-L2 search sends them to the few codes
    # near the origin. With `scale_gain` each scale k keeps a running RMS s_k of the residual it quantizes
    # (all ranks); with g_k = s_k / RMS(codebook) the search is argmin |r_k / g_k - e| and the scale adds
    # g_k * e, so every scale's residual meets the whole codebook at the codebook's own magnitude.
    # `scale_center` also keeps each scale's running mean m_k per channel and its per-channel RMS around it:
    # the search is argmin |(r_k - m_k) / g_k - e| and the scale adds g_k * e + m_k (a scale whose residuals
    # are offset from the origin would otherwise reach only the codes on its side).
    scale_gain: bool = False
    scale_center: bool = False
    scale_gain_decay: float = 0.9        # EMA decay of the per-scale residual statistics
    # Per-scale dead codes (not in VAR; off by default). The summed-hits rule above never restarts a code
    # that the fine scales use but a coarse scale never picks. With `scale_dead_code_threshold` > 0 each
    # scale k also keeps an EMA (decay `scale_dead_code_decay`, all ranks) of each code's hits per step
    # divided by the scale's mean hits per code (tokens of scale k per step / codebook size), so 1 is a fair
    # share; a code below the threshold at a scale whose EMA window holds at least
    # `scale_dead_code_min_tokens` tokens per code (tokens per code per step / (1 - decay)) restarts from a
    # residual of that scale. With `scale_gain` the codes live in the normalised space every scale searches
    # in, so a code moved to a coarse scale's residual still lies in the fine scales' distribution.
    scale_dead_code_threshold: float = 0.0
    scale_dead_code_decay: float = 0.97
    scale_dead_code_min_tokens: float = 2.0

    def __post_init__(self) -> None:
        if self.codebook_size < 1 or self.dim < 1:
            raise ConfigError(f"multiscale codebook_size and dim must be positive, got {self.codebook_size}, {self.dim}")
        if not self.patch_nums:
            raise ConfigError("multiscale patch_nums must list at least one scale")
        for hw in scale_sizes(self.patch_nums):
            if min(hw) < 1:
                raise ConfigError(f"multiscale patch_nums must be positive, got {list(self.patch_nums)}")
        if self.share_quant_resi < 0 or self.default_qresi_counts < 0:
            raise ConfigError("multiscale share_quant_resi and default_qresi_counts must not be negative")
        if not 0.0 < self.dead_code_decay < 1.0:
            raise ConfigError(f"multiscale dead_code_decay must lie strictly between 0 and 1, got {self.dead_code_decay}")
        if self.dead_code_threshold < 0 or self.kmeans_iters < 0 or self.kmeans_init_steps < 1:
            raise ConfigError("multiscale dead_code_threshold and kmeans_iters must not be negative, kmeans_init_steps >= 1")
        if self.scale_center and not self.scale_gain:
            raise ConfigError("multiscale scale_center needs scale_gain: true")
        if not 0.0 <= self.scale_gain_decay < 1.0:
            raise ConfigError(f"multiscale scale_gain_decay must lie in [0, 1), got {self.scale_gain_decay}")
        if self.scale_dead_code_threshold < 0 or self.scale_dead_code_min_tokens < 0:
            raise ConfigError("multiscale scale_dead_code_threshold and scale_dead_code_min_tokens must not be negative")
        if not 0.0 < self.scale_dead_code_decay < 1.0:
            raise ConfigError(
                f"multiscale scale_dead_code_decay must lie strictly between 0 and 1, got {self.scale_dead_code_decay}")
        if self.straight_through not in ("identity", "rotation"):
            raise ConfigError(f"multiscale straight_through must be 'identity' or 'rotation', got '{self.straight_through}'")


def scale_sizes(patch_nums) -> list[tuple[int, int]]:
    """Patch numbers as (h, w) pairs: an int p means a p x p grid."""
    return [(int(p), int(p)) if isinstance(p, (int, np.integer)) else (int(p[0]), int(p[1])) for p in patch_nums]


def phi_ticks(num_phi: int) -> np.ndarray:
    """Positions in [0, 1] of the K' Phi convs, as VAR spaces them (1/(3K') margins for K'=4, else 1/(2K'))."""
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    return np.linspace(margin, 1 - margin, num_phi)


def phi_index_table(num_scales: int, num_phi: int) -> list[int]:
    """Which Phi each scale uses: argmin |ticks - k/(K-1)| in float64 numpy, first index on ties."""
    if num_phi <= 1:
        return [0] * num_scales
    ticks = phi_ticks(num_phi)
    at = [k / (num_scales - 1) if num_scales > 1 else 1.0 for k in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - a))) for a in at]


class Phi(nn.Conv2d):
    """The residual refinement h -> (1 - r) h + r conv3x3(h)."""

    def __init__(self, dim: int, quant_resi: float) -> None:
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class PhiShared(nn.Module):
    """K' = 1: one Phi for every scale (state-dict key `qresi`)."""

    def __init__(self, qresi: nn.Module) -> None:
        super().__init__()
        self.qresi = qresi


class PhiPartiallyShared(nn.Module):
    """1 < K' : K' Phis shared among scales (state-dict keys `qresi_ls.{i}`)."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls


def _make_phi(dim: int, quant_resi: float) -> nn.Module:
    return Phi(dim, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class MultiScaleResidualVQ(CodebookGuards, Quantizer):
    """z (B, C, H, W) with (H, W) = the last patch size -> (z_q, indices (B, L), aux)."""

    def __init__(self, config: MultiScaleVQConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else MultiScaleVQConfig(**kwargs)
        self.codebook_size, self.dim = cfg.codebook_size, cfg.dim
        self.scales = scale_sizes(cfg.patch_nums)
        self.boundaries = np.cumsum([0] + [h * w for h, w in self.scales]).tolist()
        K = len(self.scales)
        if cfg.share_quant_resi == 0:
            n_phi = cfg.default_qresi_counts or K
            self.quant_resi = nn.ModuleList([_make_phi(cfg.dim, cfg.quant_resi) for _ in range(n_phi)])
            self._phis = list(self.quant_resi)
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(cfg.dim, cfg.quant_resi))
            self._phis = [self.quant_resi.qresi]
        else:
            convs = nn.ModuleList([_make_phi(cfg.dim, cfg.quant_resi) for _ in range(cfg.share_quant_resi)])
            self.quant_resi = PhiPartiallyShared(convs)
            self._phis = list(convs)
        self.phi_table = phi_index_table(K, len(self._phis))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(K, cfg.codebook_size))
        self.record_hit = 0  # like VAR, a plain counter (not saved): 0 copies, <100 blends 0.9, then 0.99
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.dim)
        # VAR leaves the init to its caller; uniform(+-1/V) is what its eini(-1) would give.
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        self.num_count_scales = K
        if cfg.kmeans_init:
            self.register_buffer("initialized", torch.tensor(False))
        if cfg.kmeans_init or cfg.dead_code_threshold > 0 or cfg.scale_dead_code_threshold > 0:
            self.register_buffer("codebook_updates", torch.tensor(0, dtype=torch.long))
        if cfg.dead_code_threshold > 0:
            self.register_buffer("ema_cluster_size", torch.ones(cfg.codebook_size))
        if cfg.scale_dead_code_threshold > 0:
            # per scale, each code's EMA of hits per step over the scale's mean hits per code (1 = fair share)
            self.register_buffer("scale_code_hits", torch.ones(K, cfg.codebook_size))
        if cfg.scale_gain:
            # per-scale, per-channel residual RMS (around the mean with scale_center; 0 = not measured yet:
            # gain 1), the mean itself, and this step's sums, sums of squares and counts
            self.register_buffer("scale_rms", torch.zeros(K, cfg.dim))
            if cfg.scale_center:
                self.register_buffer("scale_mean", torch.zeros(K, cfg.dim))
            self._gain_stats: torch.Tensor | None = None
        self._pool = RowPool()  # rows (N, C + 1): a scale's residual vector and the scale index
        self._kmeans_rows: list[torch.Tensor] = []

    @property
    def _wants_rows(self) -> bool:
        per_scale = self.config.scale_dead_code_threshold > 0 and not self.codebook_frozen
        return per_scale or CodebookGuards._wants_rows.fget(self)

    @property
    def tokens_per_image(self) -> int:
        return self.boundaries[-1]

    def phi(self, scale: int) -> nn.Module:
        return self._phis[self.phi_table[scale]]

    # ------------------------------------------------------------------ building blocks

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"MultiScaleResidualVQ expects (B, {self.dim}, H, W), got {tuple(z.shape)}")
        if tuple(z.shape[2:]) != self.scales[-1]:
            raise UserError(
                f"the multi-scale quantizer needs a {self.scales[-1][0]}x{self.scales[-1][1]} latent (its last "
                f"patch size), got {z.shape[2]}x{z.shape[3]}; use images of the tokenizer's resolution"
            )

    def _gained(self) -> bool:
        """Whether the per-scale gains apply now (not while the k-means init is pending)."""
        return self.config.scale_gain and not ("initialized" in self._buffers and not bool(self.initialized))

    @torch.no_grad()
    def gains(self) -> torch.Tensor:
        """(K, C) per-scale search gains g_k = residual RMS / codebook RMS (detached); ones without `scale_gain`,
        for scales not measured yet and while the k-means init is pending."""
        K, weight = len(self.scales), self.embedding.weight
        if not self._gained():
            return torch.ones(K, self.dim, device=weight.device)
        rms = self.scale_rms.to(weight.device).float()
        code_rms = weight.detach().float().square().mean().sqrt().clamp_min(1e-12)
        return torch.where(rms > 0, rms / code_rms, torch.ones_like(rms))

    @torch.no_grad()
    def offsets(self) -> torch.Tensor:
        """(K, C) per-scale offsets m_k (the running residual mean with `scale_center`, else zeros)."""
        weight = self.embedding.weight
        if not (self._gained() and self.config.scale_center):
            return torch.zeros(len(self.scales), self.dim, device=weight.device)
        return self.scale_mean.to(weight.device).float()

    def _nearest(self, rest: torch.Tensor, gain: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) residual -> (B, h, w) code indices of the nearest code to (rest - offset) / gain."""
        B, C, h, w = rest.shape
        flat = rest.detach().permute(0, 2, 3, 1).reshape(-1, C)
        if self.config.scale_gain:
            flat = (flat - offset) / gain
        return nearest_code(flat, self.embedding.weight.detach(), l2_norm=self.config.using_znorm).view(B, h, w)

    def _residual_of(self, idx: torch.Tensor, scale: int, size: tuple[int, int],
                     affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Phi_k(bicubic_upsample(g_k E[idx] + m_k)) for (B, h, w) indices of scale k (gain and offset only
        with `scale_gain`; `affine` = (gains, offsets) of all scales); the last scale is not resampled."""
        h = self.embedding(idx)
        if self.config.scale_gain:
            gains, offsets = (self.gains(), self.offsets()) if affine is None else affine
            h = h * gains[scale] + offsets[scale]
        h = h.permute(0, 3, 1, 2)
        if scale != len(self.scales) - 1:
            h = F.interpolate(h, size=size, mode="bicubic", align_corners=False)
        return self.phi(scale)(h.contiguous())

    def _downsample(self, f: torch.Tensor, scale: int) -> torch.Tensor:
        if scale == len(self.scales) - 1:
            return f
        return F.interpolate(f, size=self.scales[scale], mode="area")

    @torch.no_grad()
    def _residual_steps(self, z: torch.Tensor):
        """Yield (indices (B, h, w), cumulative f_hat) after each scale, without gradients."""
        self._check_latent(z)
        with fp32_no_autocast(z.device.type):
            f_rest = z.detach().float().clone()
            f_hat = torch.zeros_like(f_rest)
            gains, offsets = self.gains(), self.offsets()
            for k in range(len(self.scales)):
                idx = self._nearest(self._downsample(f_rest, k), gains[k], offsets[k])
                r = self._residual_of(idx, k, f_rest.shape[2:], (gains, offsets))
                f_hat.add_(r)
                f_rest.sub_(r)
                yield idx, f_hat.clone()

    # ------------------------------------------------------------------ public API

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Training forward: VAR's cumulative per-scale loss and the straight-through f_hat."""
        self._check_latent(z)
        B, C, H, W = z.shape
        cfg = self.config
        with fp32_no_autocast(z.device.type):
            f = z.float()
            f_no_grad = f.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_rest)
            loss = f.new_zeros(())
            entropy = f.new_zeros(())
            all_idx, scale_idx, scale_usage = [], [], []
            want_rows = self.training and self._wants_rows
            gains, offsets = self.gains(), self.offsets()
            for k in range(len(self.scales)):
                rest_k = self._downsample(f_rest, k)
                idx = self._nearest(rest_k, gains[k], offsets[k])
                if cfg.scale_gain and self.training and not self.codebook_frozen:
                    self._add_gain_stats(k, rest_k)
                if want_rows:
                    rows = rest_k.permute(0, 2, 3, 1).reshape(-1, C)
                    self._pool.add(torch.cat([rows, rows.new_full((rows.shape[0], 1), float(k))], 1))
                if cfg.entropy_weight > 0:
                    # the same residual with the encoder's gradient: f minus what earlier scales explain
                    rest_grad = self._downsample(f - f_hat.detach(), k).permute(0, 2, 3, 1).reshape(-1, C)
                    rest_grad = (rest_grad - offsets[k]) / gains[k]  # the space the search compares in
                    codes = self.embedding.weight
                    if cfg.using_znorm:  # the affinity of the search itself: distances between directions
                        rest_grad, codes = F.normalize(rest_grad, dim=-1), F.normalize(codes, dim=-1)
                    entropy = entropy + entropy_regularizer(-squared_distances(rest_grad, codes), cfg.entropy_temperature,
                                                           cfg.entropy_sample_term)
                r = self._residual_of(idx, k, (H, W), (gains, offsets))
                f_hat = f_hat + r
                f_rest = f_rest - r.detach()  # only feeds the next argmin
                # beta pulls the encoder toward sg(f_hat); the second term trains codebook and Phi
                loss = loss + cfg.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
                scale_usage.append((torch.bincount(idx.reshape(-1), minlength=self.codebook_size) > 0).float().mean())
                scale_idx.append(idx)
                all_idx.append(idx.reshape(B, -1))
            loss = loss / len(self.scales)
            aux = {}
            if cfg.entropy_weight > 0:
                aux["entropy_loss"] = entropy / len(self.scales)
                loss = loss + cfg.entropy_weight * aux["entropy_loss"]
            if cfg.straight_through == "rotation":
                rows = rotate_to(f.permute(0, 2, 3, 1).reshape(-1, C), f_hat.detach().permute(0, 2, 3, 1).reshape(-1, C))
                z_q = rows.reshape(B, H, W, C).permute(0, 3, 1, 2).to(z.dtype)
            else:
                z_q = ((f_hat.detach() - f_no_grad) + f).to(z.dtype)
        if self.training:
            self.record_counts(scale_idx)
        indices = torch.cat(all_idx, 1)
        aux.update({"loss": loss, "vq_loss": loss.detach(), "usage_per_scale": torch.stack(scale_usage)})
        aux.update(usage_stats(indices, cfg.codebook_size))
        return QuantizerOutput(z_q, indices, aux)

    # ------------------------------------------------------------------ training-time codebook care

    def _empty_gain_stats(self, device: torch.device) -> torch.Tensor:
        """(K, 2C + 1) zeros for one step's per-scale sums, sums of squares and counts (float64; MPS has none)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return torch.zeros(len(self.scales), 2 * self.dim + 1, dtype=dtype, device=device)

    @torch.no_grad()
    def _add_gain_stats(self, scale: int, rest: torch.Tensor) -> None:
        """This step's per-channel sums, sums of squares and vector count of scale k's residuals."""
        C = self.dim
        if self._gain_stats is None or self._gain_stats.device != rest.device:
            self._gain_stats = self._empty_gain_stats(rest.device)
        rows = rest.detach().to(self._gain_stats.dtype).transpose(0, 1).reshape(C, -1)
        self._gain_stats[scale, :C] += rows.sum(1)
        self._gain_stats[scale, C:2 * C] += rows.square().sum(1)
        self._gain_stats[scale, 2 * C] += rows.shape[1]

    @torch.no_grad()
    def _update_scale_stats(self) -> None:
        """Fold this step's residual statistics (all ranks) into the per-scale EMAs; a scale's first
        measurement is copied. Collective: every rank calls it once per step."""
        C, cfg = self.dim, self.config
        stats = self._gain_stats
        self._gain_stats = None
        device = self.scale_rms.device
        if stats is None:
            stats = self._empty_gain_stats(device)
        stats = all_reduce_sum_(stats.to(device))
        n = stats[:, 2 * C:].clamp_min(1)
        mean, ex2 = stats[:, :C] / n, stats[:, C:2 * C] / n
        if cfg.scale_center:
            rms = (ex2 - mean.square()).clamp_min(0).sqrt().float()
        else:  # one gain for all channels: the RMS over channels
            rms = ex2.mean(1, keepdim=True).sqrt().float().expand(-1, C)
        seen = (stats[:, 2 * C] > 0)[:, None]
        fresh = seen & (self.scale_rms <= 0).all(1, keepdim=True)
        w = 1 - cfg.scale_gain_decay

        def fold(ema: torch.Tensor, value: torch.Tensor) -> None:  # copy when fresh, EMA when seen, else keep
            ema.copy_(torch.where(fresh, value, torch.where(seen, ema.lerp(value, w), ema)))

        fold(self.scale_rms, rms)
        if cfg.scale_center:
            fold(self.scale_mean, mean.float())

    @torch.no_grad()
    def update_codebook(self, step: int = 0) -> CodebookUpdate:
        """VAR's per-scale hit EMA, k-means init and dead-code restarts from this step's training forwards.

        Collective under torch.distributed: every rank, once per optimizer step.
        """
        cfg = self.config
        counts = self.take_counts()
        update = CodebookUpdate(counts, row_params=[self.embedding.weight])
        if self.codebook_frozen:
            self._pool.clear()
            if cfg.scale_gain:
                self._gain_stats = None
            return CodebookUpdate(counts)
        if "codebook_updates" in self._buffers:
            self.codebook_updates += 1
        hits = all_reduce_sum_(counts.to(self.ema_vocab_hit_SV.device).float())
        if bool(hits.sum() > 0):  # steps without training forwards anywhere leave the EMA alone
            for k in range(len(self.scales)):
                self._record_hits(hits[k], k)
            if "ema_cluster_size" in self._buffers:
                self.ema_cluster_size.lerp_(hits.sum(0), 1 - cfg.dead_code_decay)
        if "scale_code_hits" in self._buffers:
            self._record_scale_hits(hits)
        if cfg.scale_gain:
            self._update_scale_stats()
        if cfg.kmeans_init and not bool(self.initialized):
            rows = self._pool.gather().cpu()
            if rows.shape[0]:  # a step without training forwards (anywhere) does not count
                self._kmeans_rows.append(rows)
            if len(self._kmeans_rows) >= cfg.kmeans_init_steps:
                rows = torch.cat(self._kmeans_rows)
                rows = self._equalize_scales(rows[:, :-1], rows[:, -1].long()) if cfg.scale_gain else rows[:, :-1]
                n_steps = len(self._kmeans_rows)
                self._kmeans_rows = []
                gen = seeded_generator(int(self.codebook_updates))
                means, bins = kmeans(rows, self.codebook_size, cfg.kmeans_iters, cosine=cfg.using_znorm, generator=gen)
                self.embedding.weight.data.copy_(broadcast_(means.to(self.embedding.weight.device)))
                self.initialized.fill_(True)
                if cfg.scale_gain:  # residuals after the init are not those before it: measure them afresh
                    self.scale_rms.zero_()
                    if cfg.scale_center:
                        self.scale_mean.zero_()
                if "ema_cluster_size" in self._buffers:  # hits per step expected from the k-means clusters
                    self.ema_cluster_size.copy_(broadcast_(bins.to(self.embedding.weight.device)) / max(1, n_steps))
                if "scale_code_hits" in self._buffers:  # every new code starts with a fair share at every scale
                    self.scale_code_hits.fill_(1.0)
                update.replaced = torch.ones(self.codebook_size, dtype=torch.bool, device=self.embedding.weight.device)
            return update
        if cfg.dead_code_threshold > 0 or cfg.scale_dead_code_threshold > 0:
            update.replaced = self._restart_dead_codes(hits.sum(1))
        self._pool.clear()
        return update

    @torch.no_grad()
    def _record_scale_hits(self, hits: torch.Tensor) -> None:
        """Fold this step's (all-ranks) hits of each scale, over the scale's mean hits per code, into
        `scale_code_hits`; a scale without tokens this step keeps its EMA."""
        n = hits.sum(1, keepdim=True)
        share = hits * (self.codebook_size / n.clamp_min(1))
        ema = self.scale_code_hits
        ema.copy_(torch.where(n > 0, ema.lerp(share.to(ema.dtype), 1 - self.config.scale_dead_code_decay), ema))

    def _restart_sources(self, scale_tokens: torch.Tensor) -> torch.Tensor:
        """(V,) the scale whose residual each code restarts from this step, -1 for codes kept.

        Dead by the summed hits: the i-th such code takes scale i mod K. Then, with per-scale accounting, a
        code below `scale_dead_code_threshold` at a scale whose EMA window holds enough tokens per code
        takes that scale (the coarsest such scale when there are several)."""
        cfg, K, V = self.config, len(self.scales), self.codebook_size
        source = torch.full((V,), -1, dtype=torch.long)
        if cfg.dead_code_threshold > 0:
            dead = (self.ema_cluster_size < cfg.dead_code_threshold).cpu().nonzero().squeeze(1)
            source[dead] = torch.arange(dead.numel()) % K
        if cfg.scale_dead_code_threshold > 0:
            window_tokens = scale_tokens.cpu().float() / V / (1 - cfg.scale_dead_code_decay)
            low = (self.scale_code_hits < cfg.scale_dead_code_threshold).cpu()
            for k in range(K):
                if float(window_tokens[k]) >= cfg.scale_dead_code_min_tokens:
                    source[low[k] & (source < 0)] = k
        return source

    def _equalize_scales(self, rows: torch.Tensor, scale_of: torch.Tensor) -> torch.Tensor:
        """Each scale's rows brought to the RMS of all rows (and, with `scale_center`, centred per channel
        with the per-channel RMS around the mean made equal): the space the gained search compares in."""
        target = rows.square().mean().sqrt()
        out = rows.clone()
        for k in scale_of.unique().tolist():
            x = rows[scale_of == k]
            if self.config.scale_center:
                x = x - x.mean(0)
                x = x / x.square().mean(0).sqrt().clamp_min(1e-12)
                out[scale_of == k] = x * target
            else:
                out[scale_of == k] = x * (target / x.square().mean().sqrt().clamp_min(1e-12))
        return out

    @torch.no_grad()
    def _restart_dead_codes(self, scale_tokens: torch.Tensor) -> torch.Tensor | None:
        """Restart the codes `_restart_sources` names from residuals of their scale (every rank's pool, drawn
        with the update count's generator, so all ranks agree); returns the mask of restarted codes.
        Collective when anything is to restart (the masks are built from all-reduced hits)."""
        K = len(self.scales)
        source = self._restart_sources(scale_tokens)
        restart = source >= 0
        n_dead = int(restart.sum())
        if n_dead == 0:
            return None
        pool = self._pool.gather()
        if pool.shape[0] == 0:
            return None
        gen = seeded_generator(int(self.codebook_updates))
        scale_of = pool[:, -1].long()
        # dead code i takes a residual of its source scale: every scale, coarse ones included, gets new codes
        new = torch.empty(n_dead, self.dim + 1, device=pool.device)
        targets = source[restart]
        for k in range(K):
            want = int((targets == k).sum())
            rows = pool[scale_of == k]
            if want and rows.shape[0]:
                new[targets == k] = pick_rows(rows, want, gen)
            elif want:
                new[targets == k] = pick_rows(pool, want, gen)
        new, new_scale = new[:, :-1], new[:, -1].long()
        if self.config.scale_gain:  # a restarted code sits where its residual meets the search
            new = (new - self.offsets().to(new.device)[new_scale]) / self.gains().to(new.device)[new_scale]
        weight = self.embedding.weight.data
        dead = restart.to(weight.device)
        weight[dead] = new.to(weight.device, weight.dtype)
        if "ema_cluster_size" in self._buffers:  # codes live by the summed hits stay as they were
            self.ema_cluster_size[dead] = self.ema_cluster_size[dead].clamp_min(self.config.dead_code_threshold)
        if "scale_code_hits" in self._buffers:  # a new code gets a fair share's grace at every scale
            self.scale_code_hits[:, dead] = 1.0
        return dead

    @torch.no_grad()
    def _record_hits(self, hits: torch.Tensor, scale: int) -> None:
        """VAR's per-scale EMA of (all-ranks) hits: the first record copies, <100 blends 0.9, then 0.99.

        VAR only updates the EMA when a process group exists; here single-process training updates it too.
        """
        ema = self.ema_vocab_hit_SV[scale]
        if self.record_hit == 0:
            ema.copy_(hits)
        elif self.record_hit < 100:
            ema.mul_(0.9).add_(hits, alpha=0.1)
        else:
            ema.mul_(0.99).add_(hits, alpha=0.01)
        self.record_hit += 1

    def encode_scales(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale token maps, coarse first: [(B, h_k * w_k)] int64 (VAR's img_to_idxBl after the encoder)."""
        return [idx.reshape(idx.shape[0], -1) for idx, _ in self._residual_steps(z)]

    def f_hat_per_scale(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Cumulative f_hat (B, C, H, W) after each scale."""
        return [f_hat for _, f_hat in self._residual_steps(z)]

    def _as_grid(self, idx: torch.Tensor, scale: int) -> torch.Tensor:
        h, w = self.scales[scale]
        if idx.ndim == 2 and idx.shape[1] == h * w:
            return idx.view(idx.shape[0], h, w)
        if idx.ndim == 3 and tuple(idx.shape[1:]) == (h, w):
            return idx
        raise UserError(f"scale {scale} needs {h}x{w} = {h * w} tokens per image, got shape {tuple(idx.shape)}")

    def decode_scales(self, idx_per_scale: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """f_hat (B, C, H, W) = sum of the first `upto` scales' residuals (all given scales by default)."""
        upto = len(idx_per_scale) if upto is None else upto
        if not 1 <= upto <= len(idx_per_scale) or len(idx_per_scale) > len(self.scales):
            raise UserError(
                f"cannot decode {upto} of {len(idx_per_scale)} given scales; this quantizer has {len(self.scales)}"
            )
        grids = [self._as_grid(idx.long(), k) for k, idx in enumerate(idx_per_scale[:upto])]
        for g in grids:
            self.check_indices(g)
        with fp32_no_autocast(grids[0].device.type):
            f_hat = None
            for k, g in enumerate(grids):
                r = self._residual_of(g, k, self.scales[-1])
                f_hat = r if f_hat is None else f_hat + r
        return f_hat

    def next_scale_input(self, f_hat: torch.Tensor, idx: torch.Tensor, scale: int, check: bool = True,
                         affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR's sampling step: add scale k's residual Phi_k(bicubic_up(E[idx])) to f_hat (B, C, H, W) in place;
        return (f_hat, the input of scale k + 1: f_hat area-downsampled to its size, or f_hat after the last).

        A CUDA-graph step may not wait on the device: it passes `check=False` (its sampler's codes are in range)
        and `affine`, this quantizer's (gains(), offsets()) read once before the step."""
        grid = self._as_grid(idx.long(), scale)
        if check:
            self.check_indices(grid)
        with fp32_no_autocast(grid.device.type):
            f_hat.add_(self._residual_of(grid, scale, self.scales[-1], affine))
        if scale == len(self.scales) - 1:
            return f_hat, f_hat
        return f_hat, F.interpolate(f_hat, size=self.scales[scale + 1], mode="area")

    def split_scales(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) -> [(B, h_k * w_k)] for the K scales, or for a prefix when L ends on a scale boundary."""
        L = indices.shape[-1]
        if indices.ndim != 2 or L not in self.boundaries[1:]:
            raise UserError(
                f"multi-scale indices must be (batch, tokens) with tokens one of {self.boundaries[1:]}, "
                f"got shape {tuple(indices.shape)}"
            )
        n = self.boundaries.index(L)
        return [indices[:, self.boundaries[k]:self.boundaries[k + 1]] for k in range(n)]

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat indices (B, L) -> f_hat (B, C, H, W); a prefix of scales decodes to its partial sum."""
        return self.decode_scales(self.split_scales(indices))

    def teacher_forcing_input(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """VAR's idxBl_to_var_input: (B, L - h_0 w_0, C), the cumulative f_hat after scale k area-downsampled
        to scale k + 1, tokens row-major with channels last, for k = 0 .. K-2."""
        grids = [self._as_grid(idx.long(), k) for k, idx in enumerate(idx_per_scale)]
        if len(grids) != len(self.scales):
            raise UserError(f"teacher forcing needs all {len(self.scales)} scales, got {len(grids)}")
        B = grids[0].shape[0]
        with fp32_no_autocast(grids[0].device.type):
            f_hat = torch.zeros(B, self.dim, *self.scales[-1], device=grids[0].device)
            out = []
            for k in range(len(self.scales) - 1):
                f_hat = f_hat + self._residual_of(grids[k], k, self.scales[-1])
                nxt = F.interpolate(f_hat, size=self.scales[k + 1], mode="area")
                out.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(out, 1) if out else torch.zeros(B, 0, self.dim, device=grids[0].device)


__all__ = [
    "MultiScaleVQConfig",
    "MultiScaleResidualVQ",
    "Phi",
    "phi_index_table",
    "phi_ticks",
    "scale_sizes",
]
