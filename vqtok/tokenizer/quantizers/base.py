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
- `forward` never communicates across ranks: encode, sample and eval call it a different number
  of times on different ranks. A training forward only *records* what it saw (code histograms, encoder
  vectors); `update_codebook()`, called once per optimizer step on every rank (the tokenizer task does it),
  applies k-means init, EMA codebooks and dead-code restarts, all-reducing what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import contextlib

import torch
from torch import nn


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor
    indices: torch.Tensor
    aux: dict[str, torch.Tensor]


@dataclass
class CodebookUpdate:
    """What `update_codebook()` did in one step.

    counts: this rank's code histograms since the last update, (scales, codebook_size) int64 (one row for a
    single-scale quantizer); replaced: bool (codebook_size,) of codes re-seeded this step (k-means init or
    dead-code restart) or None; row_params: the learnable parameters indexed by code on their first dim,
    whose optimizer moments and weight-EMA rows the trainer resets for replaced codes.
    """

    counts: torch.Tensor
    replaced: torch.Tensor | None = None
    row_params: list[nn.Parameter] = field(default_factory=list)


class Quantizer(nn.Module):
    """Base class: subclasses set `codebook_size` and `dim` and implement forward / indices_to_codes."""

    codebook_size: int
    dim: int
    num_count_scales: int = 1  # rows of CodebookUpdate.counts
    # set by decoder-only fine-tuning (train.freeze=...,quantizer): histograms are still kept for the
    # usage monitor, but update_codebook() never changes the codebook
    codebook_frozen: bool = False

    def record_counts(self, indices: torch.Tensor | list[torch.Tensor]) -> None:
        """Training forwards add their code histogram (per scale when given a list) to this rank's tally."""
        if not self.training:
            return
        parts = indices if isinstance(indices, (list, tuple)) else [indices]
        hist = torch.stack([torch.bincount(p.reshape(-1).long(), minlength=self.codebook_size) for p in parts])
        pending = self.__dict__.get("_pending_counts")
        self.__dict__["_pending_counts"] = hist if pending is None else pending + hist

    def take_counts(self) -> torch.Tensor:
        pending = self.__dict__.pop("_pending_counts", None)
        if pending is None:
            return torch.zeros(self.num_count_scales, self.codebook_size, dtype=torch.long)
        return pending.cpu()

    def pending_state(self) -> dict[str, Any]:
        """Training statistics carried between steps that are not model weights (for exact resume)."""
        rows = self.__dict__.get("_kmeans_rows")
        return {"kmeans_rows": [r.clone() for r in rows]} if rows else {}

    def load_pending_state(self, state: dict[str, Any]) -> None:
        if "kmeans_rows" in state and "_kmeans_rows" in self.__dict__:
            self.__dict__["_kmeans_rows"] = [r.clone() for r in state["kmeans_rows"]]

    def update_codebook(self, step: int = 0) -> CodebookUpdate:
        """Apply the statistics recorded by this step's training forwards. Collective: every rank, once per step."""
        return CodebookUpdate(self.take_counts())

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


def usage_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Fraction of codes used and perplexity of this batch's code histogram on this rank (never all-reduced:
    the trainer reduces usage over a window of steps at log steps, see vqtok/train/codebook_monitor.py)."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean().detach(), "perplexity": entropy.exp().detach()}
