"""The interface every quantizer shares.

    z_q, indices, aux = quantizer(z)      # z: (B, C, H, W) float, channel-first
    codes = quantizer.indices_to_codes(indices)

- `z_q` has the shape and dtype of `z` and carries the straight-through gradient to the encoder.
- `indices` are int64. Single-scale quantizers return the token grid (B, H, W), row-major; the
  multi-scale residual quantizer returns all scales concatenated, (B, sum_k h_k * w_k), coarse first.
- `aux` maps names to tensors. `aux["loss"]` is the weighted sum of the quantizer's own losses (a 0-dim
  tensor, zero when it has none); the individual terms and detached statistics (`usage`: fraction of
  codes hit in the batch, `perplexity`) sit beside it under their own names.
- Distance, rounding and entropy math run in float32 with autocast disabled, whatever the caller uses.
"""

from __future__ import annotations

from typing import NamedTuple

import contextlib

import torch
from torch import nn


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor
    indices: torch.Tensor
    aux: dict[str, torch.Tensor]


class Quantizer(nn.Module):
    """Base class: subclasses set `codebook_size` and `dim` and implement forward / indices_to_codes."""

    codebook_size: int
    dim: int

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_indices(self, indices: torch.Tensor) -> None:
        """Raise a UserError when an index lies outside the codebook."""
        from vqtok.errors import UserError

        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise UserError(
                f"token index {int(indices.max()) if int(indices.max()) >= self.codebook_size else int(indices.min())} "
                f"is outside the codebook (valid: 0..{self.codebook_size - 1})"
            )


def fp32_no_autocast(device_type: str):
    """Context that disables autocast so quantizer math stays in float32."""
    if device_type == "meta":  # shape-only runs (the --dry-run memory estimate): there is no autocast to disable
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def usage_stats(indices: torch.Tensor, codebook_size: int, all_reduce: bool = True) -> dict[str, torch.Tensor]:
    """Fraction of codes used and perplexity of the code histogram, all-reduced under DDP."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).float()
    if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean().detach(), "perplexity": entropy.exp().detach()}
