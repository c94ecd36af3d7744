"""The KV cache every generator family decodes over (RAR, LlamaGen, VAR).

Keys and values of every layer for a whole sequence are allocated once, (rows, heads, max_len, head_dim) per
layer, in the dtype attention computes in. A step writes its keys and values in place and attends over the
filled prefix, so no tensor grows by concatenation (the official caches copy O(L^2) memory over a sample),
and every tensor keeps its address across steps and batches (what CUDA graphs need).
"""

from __future__ import annotations

import torch


class KVCache:
    """`update(layer, k, v, start)` writes k, v (rows, heads, T, head_dim) at positions start..start+T-1
    (default `start`: `length`, the positions already filled) and returns the keys and values of positions
    0..start+T-1. `length` is the caller's: the model or decoder advances it once every layer has written.
    `zeroed` fills the buffers with zeros instead of leaving them uninitialised; no decoder reads a
    position before writing it."""

    def __init__(self, layers: int, rows: int, heads: int, max_len: int, head_dim: int, device, dtype,
                 zeroed: bool = False):
        shape = (rows, heads, max_len, head_dim)
        make = torch.zeros if zeroed else torch.empty
        self.k = [make(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [make(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.rows, self.max_len, self.length = rows, max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.length if start is None else start
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


__all__ = ["KVCache"]
