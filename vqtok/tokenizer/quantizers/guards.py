"""Anti-collapse aids shared by the VQ and multi-scale quantizers.

- `RowPool`: the detached encoder vectors a training forward saw, kept until the step's `update_codebook()`
  (k-means init and dead-code restarts draw from it, gathered over all ranks).
- `pick_rows`: choose replacement vectors from the gathered pool with a generator seeded by the update
  count, so every rank (and a 1-process run of the same global batch) makes the same choice without a
  broadcast.
- `rotate_to`: the rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
  Trick"), a straight-through estimator that carries the angle and norm between an encoder vector and its
  code into the backward pass instead of copying the gradient unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqtok.distributed import all_gather_rows

# Rows a rank keeps per step for restarts and k-means (beyond this a uniform subsample is kept).
POOL_ROWS = 1 << 16


class CodebookGuards:
    """Mixin for the quantizers with a learned codebook (VQ, multi-scale): whether this step's training
    forwards must keep encoder vectors, for k-means init (until done) or dead-code restarts."""

    @property
    def _wants_rows(self) -> bool:
        cfg = self.config
        if self.codebook_frozen:
            return False
        return cfg.dead_code_threshold > 0 or (cfg.kmeans_init and not bool(self.initialized))

    def _dead_codes_and_pool(self) -> tuple[torch.Tensor, int, torch.Tensor] | None:
        """(dead mask, how many, every rank's pooled rows) when codes are below the dead-code threshold and
        rows were kept; None when there is nothing to restart. The mask is identical on every rank (it is
        built from all-reduced hits); the gather is a collective, so every rank calls this together."""
        dead = self.ema_cluster_size < self.config.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        pool = self._pool.gather()
        if pool.shape[0] == 0:
            return None
        return dead, n_dead, pool


class RowPool:
    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor) -> None:
        self.parts.append(rows.detach().float())
        # a caller that never runs update_codebook() (a hand-written loop) must not grow memory without end
        while len(self.parts) > 1 and sum(p.shape[0] for p in self.parts[1:]) >= 4 * POOL_ROWS:
            self.parts.pop(0)

    def gather(self) -> torch.Tensor:
        """Every rank's rows concatenated in rank order (a collective), then the pool is emptied."""
        local = torch.cat(self.parts) if self.parts else torch.zeros(0, 0)
        self.parts = []
        if local.shape[0] > POOL_ROWS:
            local = local[torch.randperm(local.shape[0], device=local.device)[:POOL_ROWS]]
        return all_gather_rows(local)

    def clear(self) -> None:
        self.parts = []

    def __len__(self) -> int:
        return sum(p.shape[0] for p in self.parts)


def seeded_generator(count: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that every rank seeds identically (the update count is part of the model state)."""
    return torch.Generator().manual_seed(0x5EED + 1_000_003 * int(count) + int(salt))


def pick_rows(pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows of `pool` drawn uniformly (with replacement only when the pool is smaller than n)."""
    if pool.shape[0] >= n:
        idx = torch.randperm(pool.shape[0], generator=generator)[:n]
    else:
        idx = torch.randint(0, pool.shape[0], (n,), generator=generator)
    return pool[idx.to(pool.device)]


def rotate_to(e: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rows of `e` (N, D) mapped onto `q` by the rotation + rescaling that takes each e to its q.

    The forward value is q; the backward sees the fixed linear map R (|q| / |e|) with
    R = I - 2 w w^T + 2 q̂ ê^T, w = (ê + q̂) / |ê + q̂|, applied to e (coefficients detached), so the
    gradient reaching e is rotated like e was, instead of being copied (the usual straight-through).
    """
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (e / e_norm).detach()
    qh = (q / q_norm).detach()
    w = F.normalize(u + qh, dim=-1, eps=eps).detach()
    rotated = e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * qh
    out = rotated * (q_norm / e_norm).detach()
    # antiparallel pairs (ê = -q̂) have no unique rotation: fall back to the plain straight-through there
    bad = (u * qh).sum(-1, keepdim=True) < -1 + 1e-4
    plain = e + (q - e).detach()
    return torch.where(bad, plain, out)
