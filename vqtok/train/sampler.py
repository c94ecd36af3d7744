"""Deterministic data order: an endless stream of per-epoch permutations, addressed by step.

Sample slot p (counting every image the run has drawn) lies in epoch p // N at position p % N of
permutation(seed, epoch). Step s draws slots [s*B, (s+1)*B) for global batch B; rank r of W takes the
r-th contiguous 1/W of them. Everything is a function of (seed, step), so resuming at step s or
running on another number of ranks reads exactly the same images with the same augmentation keys
(epoch, index), and nothing about the data order needs checkpointing.
"""

from __future__ import annotations

from typing import Iterator

import torch

from vqtok.errors import UserError


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class StreamBatchSampler:
    """Yields, for steps start, start+1, ..., this rank's list of (epoch, index) keys."""

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise UserError("the dataset is empty")
        if global_batch % world:
            raise UserError(f"the global batch size {global_batch} is not divisible by the {world} processes")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._perms[epoch]

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        local = self.global_batch // self.world
        first = step * self.global_batch + self.rank * local
        return [(p // self.n, self._perm(p // self.n)[p % self.n]) for p in range(first, first + local)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.keys_for_step(step)
            step += 1
