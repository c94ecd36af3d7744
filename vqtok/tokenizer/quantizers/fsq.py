"""Finite scalar quantization (Mentzer et al. 2023): bound each channel, round it, no codebook to learn.

Channel i takes L_i values. The bound follows vector-quantize-pytorch (since 2024-01), not the paper's
appendix: half_l = (L-1)(1+eps)/2, offset = 0.5 for even L, shift = atanh(offset/half_l),
bounded = tanh(z + shift) * half_l - offset, so f(0) = 0 and even L gives asymmetric codes
(L=8: -1, -0.75, ..., 0.75). Codes are round(bounded) / (L // 2) with a straight-through round.

Index = sum_i level_index_i * prod(L_0 .. L_{i-1}): mixed radix, first channel least significant.
Indices are computed from the rounded integers in int64 (never through bf16, which cannot hold every index exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vqtok.errors import ConfigError
from vqtok.tokenizer.quantizers.base import Quantizer, QuantizerOutput, fp32_no_autocast, usage_stats

# The FSQ paper's Table 1 levels per target codebook size (actual sizes: 240, 1000, 4375, 15360, 64000).
FSQ_LEVEL_PRESETS: dict[int, list[int]] = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}


@dataclass
class FSQConfig:
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    dim: int | None = None    # encoder channels; projections are added when != len(levels)
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not self.levels:
            raise ConfigError("fsq levels must list at least one level")
        bad = [level for level in self.levels if level < 3]
        if bad:
            raise ConfigError(
                f"fsq levels must each be at least 3, got {bad[0]} (a level of 2 collapses to the codes -1 and 0)"
            )
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"fsq dim must be positive or null, got {self.dim}")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return x + (x.round() - x).detach()


class FSQ(Quantizer):
    """z (B, dim, H, W) -> (z_q, indices (B, H, W), aux with a zero loss)."""

    def __init__(self, config: FSQConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else FSQConfig(**kwargs)
        self.levels = list(cfg.levels)
        self.codebook_size = math.prod(self.levels)
        self.dim = cfg.dim or len(self.levels)
        d = len(self.levels)
        self.project_in = nn.Linear(self.dim, d) if self.dim != d else None
        self.project_out = nn.Linear(d, self.dim) if self.dim != d else None
        levels = torch.tensor(self.levels, dtype=torch.float64)
        half_l = (levels - 1) * (1 + cfg.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        # constants in float64, stored float32: derived from the config, so not saved in checkpoints
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("_half_width", (levels // 2).float(), persistent=False)
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.long), 0)
        self.register_buffer("_basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) codes in [-1, 1] -> (...) int64."""
        level_idx = torch.round(codes.double() * self._half_width.double()).long() + self._half_width.long()
        return (level_idx * self._basis).sum(-1)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices.long()[..., None] // self._basis) % self._levels

    def indices_to_normalized_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) -> (..., d) codes in [-1, 1], before project_out."""
        return (self.indices_to_level_indices(indices).float() - self._half_width) / self._half_width

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, dim, H, W); any other shape (...) -> (..., dim)."""
        self.check_indices(indices)
        with fp32_no_autocast(indices.device.type):
            codes = self.indices_to_normalized_codes(indices)
            if self.project_out is not None:
                codes = self.project_out(codes)
        return codes.permute(0, 3, 1, 2).contiguous() if indices.ndim == 3 else codes

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"FSQ expects (B, {self.dim}, H, W), got {tuple(z.shape)}")
        B, C, H, W = z.shape
        with fp32_no_autocast(z.device.type):
            x = z.float().permute(0, 2, 3, 1).reshape(-1, C)
            if self.project_in is not None:
                x = self.project_in(x)
            rounded = round_ste(self.bound(x))
            # integer level indices straight from the rounded values: exact, no float index arithmetic
            level_idx = rounded.detach().long() + self._half_width.long()
            indices = (level_idx * self._basis).sum(-1)
            codes = rounded / self._half_width
            out = self.project_out(codes) if self.project_out is not None else codes
            z_q = out.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        aux = {"loss": z.new_zeros((), dtype=torch.float32)}
        aux.update(usage_stats(indices, self.codebook_size))
        self.record_counts(indices)
        return QuantizerOutput(z_q, indices.view(B, H, W), aux)


def fsq_levels_for(codebook_size: int) -> list[int]:
    """The paper's levels for a target size (256, 1024, 4096, 16384 or 65536)."""
    if codebook_size not in FSQ_LEVEL_PRESETS:
        raise ConfigError(
            f"no FSQ level preset for {codebook_size} codes; choose one of {sorted(FSQ_LEVEL_PRESETS)} or give levels"
        )
    return list(FSQ_LEVEL_PRESETS[codebook_size])


__all__ = ["FSQ", "FSQConfig", "FSQ_LEVEL_PRESETS", "fsq_levels_for", "round_ste"]
