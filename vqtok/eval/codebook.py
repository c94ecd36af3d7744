"""Codebook statistics over a whole evaluation set: usage, entropy and perplexity, per scale.

Usage is the fraction of codes hit at least once. For big codebooks it saturates (16,384 codes, 12.8M
val tokens: almost any tokenizer hits most codes once), so we also report the entropy of the code
histogram (in bits) and its perplexity, 2**entropy: the effective number of codes in use.

Statistics are accumulated over every token of the set (not averaged per batch), since a batch of a
few hundred tokens cannot show a codebook of thousands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vqtok.errors import UserError


@dataclass
class CodebookSummary:
    usage: float  # fraction of codes hit at least once
    codes_used: int
    entropy_bits: float  # entropy of the code histogram
    perplexity: float  # 2 ** entropy_bits
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "usage": self.usage,
            "codes_used": self.codes_used,
            "entropy_bits": self.entropy_bits,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
        }


def summarize_counts(counts: torch.Tensor) -> CodebookSummary:
    """Usage, entropy (bits) and perplexity of one code histogram."""
    counts = counts.double()
    total = float(counts.sum())
    if total == 0:
        return CodebookSummary(0.0, 0, 0.0, 1.0, 0)
    probs = counts[counts > 0] / total
    entropy = float(-(probs * torch.log2(probs)).sum())
    used = int((counts > 0).sum())
    return CodebookSummary(used / counts.numel(), used, entropy, 2.0**entropy, int(total))


class CodebookStats:
    """Accumulates code histograms over batches of token sequences (B, tokens_per_image).

    `scales` is the tokenizer's token grid per scale, coarse first; a single-scale tokenizer has one.
    Multi-scale token sequences are the scales concatenated in that order, so the per-scale histograms
    come from consecutive slices of each sequence.
    """

    def __init__(self, vocab_size: int, scales: list[tuple[int, int]] | None = None):
        if vocab_size < 1:
            raise UserError(f"codebook size must be positive, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.scales = [tuple(int(v) for v in s) for s in (scales or [])]
        self.tokens_per_image = sum(h * w for h, w in self.scales) if self.scales else None
        n_scales = max(1, len(self.scales))
        self.counts = torch.zeros(n_scales, self.vocab_size, dtype=torch.int64)

    def update(self, tokens: torch.Tensor) -> None:
        tokens = tokens.detach().to("cpu", torch.int64)
        if tokens.dim() != 2:
            tokens = tokens.reshape(tokens.shape[0], -1)
        if self.tokens_per_image is not None and tokens.shape[1] != self.tokens_per_image:
            raise UserError(f"expected {self.tokens_per_image} tokens per image for scales {self.scales}, got {tokens.shape[1]}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise UserError(f"token indices must lie in 0..{self.vocab_size - 1}")
        if len(self.scales) <= 1:
            self.counts[0] += torch.bincount(tokens.reshape(-1), minlength=self.vocab_size)
            return
        start = 0
        for k, (h, w) in enumerate(self.scales):
            part = tokens[:, start : start + h * w]
            self.counts[k] += torch.bincount(part.reshape(-1), minlength=self.vocab_size)
            start += h * w

    def all_reduce(self) -> None:
        """Sum the histograms across ranks under torch.distributed (no-op otherwise)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counts)

    def overall(self) -> CodebookSummary:
        return summarize_counts(self.counts.sum(dim=0))

    def per_scale(self) -> list[CodebookSummary]:
        """One summary per scale; empty for a single-scale tokenizer (use `overall`)."""
        if len(self.scales) <= 1:
            return []
        return [summarize_counts(c) for c in self.counts]

    def report(self) -> dict:
        out: dict = {"vocab_size": self.vocab_size, **self.overall().as_dict()}
        scales = self.per_scale()
        if scales:
            out["per_scale"] = [
                {"scale": f"{h}x{w}", **s.as_dict()} for (h, w), s in zip(self.scales, scales)
            ]
        return out


def max_entropy_bits(vocab_size: int) -> float:
    """Entropy of a uniform histogram: the ceiling `entropy_bits` can reach."""
    return math.log2(vocab_size)
