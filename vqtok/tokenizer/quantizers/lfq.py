"""Lookup-free quantization (MAGVIT-v2): each of K channels becomes one bit, q = sign(x) * scale.

Bit order (how the K bits make an index):
- "msb" (default, lucidrains/vector-quantize-pytorch): channel 0 is the most significant bit,
  index = sum_k bit_k * 2^(K-1-k).
- "lsb" (Open-MAGVIT2 / SEED-Voken): channel 0 is the least significant bit, index = sum_k bit_k * 2^k.
The two orders are bit reversals of each other (`convert_bit_order`); checkpoints are not interchangeable.

Entropy loss, with logits 2 x.c / T over the 2^K codes c in {-s, +s}^K (T = 0.01 in both anchors):
- per-sample entropy: p(c | x) factorizes over bits, p_k(+) = sigmoid(4 s x_k / T), so the entropy is the sum
  of K binary entropies: O(K) per token, exact.
- codebook entropy H(mean_tokens p): does not factorize, but p(c | x) = p_hi(c_hi | x) p_lo(c_lo | x) for a split
  of the bits into two halves, so mean_tokens p = P_hi^T P_lo / N, one (2^(K/2) x 2^(K/2)) matmul. Exact and
  differentiable, with (N x 2^(K/2)) intermediates instead of N x 2^K (2^18 codes: 512 columns, not 262144).
loss = entropy_weight * (per_sample - diversity_gamma * codebook) + commitment_weight * mse(x, sg(q)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.errors import ConfigError
from vqtok.tokenizer.quantizers.base import Quantizer, QuantizerOutput, fp32_no_autocast, usage_stats
from vqtok.distributed import all_reduce_mean


@dataclass
class LFQConfig:
    codebook_size: int = 2**18           # a power of two: 2^K codes from K bits
    dim: int | None = None               # encoder channels; projections are added when != K
    codebook_scale: float = 1.0
    bit_order: Literal["msb", "lsb"] = "msb"
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0
    commitment_weight: float = 0.25
    temperature: float = 0.01
    entropy_eps: float = 1e-5            # codebook entropy uses log(avg + eps), as Open-MAGVIT2
    all_reduce_avg_probs: bool = True    # codebook entropy over all ranks' tokens (lucidrains) or per rank

    def __post_init__(self) -> None:
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ConfigError(f"lfq codebook_size must be a power of two (2^bits), got {self.codebook_size}")
        if self.bit_order not in ("msb", "lsb"):
            raise ConfigError(f"lfq bit_order must be 'msb' or 'lsb', got '{self.bit_order}'")
        if self.temperature <= 0 or self.codebook_scale <= 0:
            raise ConfigError("lfq temperature and codebook_scale must be positive")
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"lfq dim must be positive or null, got {self.dim}")


def bit_weights(bits: int, bit_order: str, device=None) -> torch.Tensor:
    """2^position of each channel's bit, int64."""
    exponents = torch.arange(bits - 1, -1, -1) if bit_order == "msb" else torch.arange(bits)
    return (2 ** exponents).to(device=device, dtype=torch.long)


def bits_to_indices(bits: torch.Tensor, bit_order: str = "msb") -> torch.Tensor:
    """(..., K) of {0,1} (or bool) -> (...) int64."""
    return (bits.long() * bit_weights(bits.shape[-1], bit_order, bits.device)).sum(-1)


def indices_to_bits(indices: torch.Tensor, bits: int, bit_order: str = "msb") -> torch.Tensor:
    """(...) int64 -> (..., K) of {0,1} int64."""
    return (indices.long()[..., None] // bit_weights(bits, bit_order, indices.device)) % 2


def convert_bit_order(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Reverse the bits of each index: msb-ordered <-> lsb-ordered (its own inverse)."""
    return bits_to_indices(indices_to_bits(indices, bits, "msb"), "lsb")


def binary_entropy_from_logits(a: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(a)), stable for large |a|."""
    p = torch.sigmoid(a)
    return -(p * F.logsigmoid(a) + (1 - p) * F.logsigmoid(-a))


def per_sample_entropy(x: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """Mean over tokens of H(softmax_c(2 x.c / T)) for x (N, K), computed bit by bit."""
    return binary_entropy_from_logits(4 * scale * x / temperature).sum(-1).mean()


def _joint_probs(logit_plus: torch.Tensor) -> torch.Tensor:
    """(N, k) per-bit logits of P(+), most significant first -> (N, 2^k) probabilities of every k-bit
    pattern in index order: exp(sum_k log p_k(b_k)) as one (N, 2k) x (2k, 2^k) matmul in log space."""
    k = logit_plus.shape[1]
    patterns = indices_to_bits(torch.arange(2**k, device=logit_plus.device), k, "msb").to(logit_plus.dtype)
    log_p = torch.cat([F.logsigmoid(logit_plus), F.logsigmoid(-logit_plus)], 1)  # log p(+), log p(-)
    return torch.exp(log_p @ torch.cat([patterns, 1 - patterns], 1).t())


def average_code_probs(x: torch.Tensor, scale: float, temperature: float, bit_order: str = "msb") -> torch.Tensor:
    """mean_tokens softmax_c(2 x.c / T) as a (2^K,) vector in index order, via the hi/lo bit split."""
    K = x.shape[1]
    logits = 4 * scale * x / temperature  # p_k(+) = sigmoid(logits_k)
    by_significance = logits if bit_order == "msb" else logits.flip(1)
    k_hi = K // 2
    p_hi, p_lo = _joint_probs(by_significance[:, :k_hi]), _joint_probs(by_significance[:, k_hi:])
    return (p_hi.t() @ p_lo).flatten() / x.shape[0]  # index = hi * 2^k_lo + lo


def codebook_entropy(avg_probs: torch.Tensor, eps: float) -> torch.Tensor:
    return -(avg_probs * torch.log(avg_probs + eps)).sum()


class LFQ(Quantizer):
    """z (B, dim, H, W) -> (z_q, indices (B, H, W), aux)."""

    def __init__(self, config: LFQConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else LFQConfig(**kwargs)
        self.codebook_size = cfg.codebook_size
        self.bits = int(math.log2(cfg.codebook_size))
        self.dim = cfg.dim or self.bits
        self.project_in = nn.Linear(self.dim, self.bits) if self.dim != self.bits else None
        self.project_out = nn.Linear(self.bits, self.dim) if self.dim != self.bits else None

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, dim, H, W); any other shape (...) -> (..., dim)."""
        self.check_indices(indices)
        s = self.config.codebook_scale
        with fp32_no_autocast(indices.device.type):
            codes = indices_to_bits(indices, self.bits, self.config.bit_order).float() * (2 * s) - s
            if self.project_out is not None:
                codes = self.project_out(codes)
        return codes.permute(0, 3, 1, 2).contiguous() if indices.ndim == 3 else codes

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"LFQ expects (B, {self.dim}, H, W), got {tuple(z.shape)}")
        B, C, H, W = z.shape
        cfg = self.config
        s = cfg.codebook_scale
        with fp32_no_autocast(z.device.type):
            x = z.float().permute(0, 2, 3, 1).reshape(-1, C)
            if self.project_in is not None:
                x = self.project_in(x)
            positive = x > 0
            q = torch.where(positive, s, -s)
            indices = bits_to_indices(positive, cfg.bit_order)
            commitment = F.mse_loss(x, q)  # q carries no gradient: a constant target
            aux = {"commitment_loss": commitment}
            loss = cfg.commitment_weight * commitment
            if cfg.entropy_weight > 0:
                sample_h = per_sample_entropy(x, s, cfg.temperature)
                avg = average_code_probs(x, s, cfg.temperature, cfg.bit_order)
                if cfg.all_reduce_avg_probs and self.training:  # training steps only: equal calls on every rank
                    avg = all_reduce_mean(avg)
                book_h = codebook_entropy(avg, cfg.entropy_eps)
                entropy = sample_h - cfg.diversity_gamma * book_h
                aux.update(per_sample_entropy=sample_h.detach(), codebook_entropy=book_h.detach(), entropy_loss=entropy)
                loss = loss + cfg.entropy_weight * entropy
            out = x + (q - x).detach()  # straight-through, in train and eval (the value is q either way)
            if self.project_out is not None:
                out = self.project_out(out)
            z_q = out.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        aux["loss"] = loss
        aux.update(usage_stats(indices, self.codebook_size))
        self.record_counts(indices)
        return QuantizerOutput(z_q, indices.view(B, H, W), aux)


__all__ = [
    "LFQ",
    "LFQConfig",
    "average_code_probs",
    "binary_entropy_from_logits",
    "bits_to_indices",
    "codebook_entropy",
    "convert_bit_order",
    "indices_to_bits",
    "per_sample_entropy",
]
