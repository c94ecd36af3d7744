"""RAR's decoders for the one sampling loop (vqtok.ar.sampling.sample): one token per step.

CachedDecoder   the KV cache allocated once per row count; prefill [cls, cond], then one token per step
StaticDecoder   the same with every input and output in a static buffer refilled in place (the layout CUDA
                graphs need; vqtok.ar.cuda_graphs.CUDAGraphDecoder replays it)
FullRecompute   re-runs the whole prefix every step: the slow reference the cached paths are tested against

Each returns logits shaped (rows, 1, V) and takes the fed-back tokens as (rows, 1).
"""

from __future__ import annotations

import torch

from vqtok.ar.rar import PREFIX, RAR, RARKVCache, group_conditions
from vqtok.ar.sampling import cache_fits


class CachedDecoder:
    """Eager KV-cached decoding; the cache is allocated once per row count and reused across batches.

    Conditions are grouped at prefill from the batch's condition ids (`group_conditions`), so rows that
    share a class (every null row under CFG) share the adaLN modulation.
    """

    def __init__(self, model: RAR):
        self.model = model
        self.cache: RARKVCache | None = None

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        if not cache_fits(self.cache, cond_ids.shape[0], cond_ids.device, self.model.lm_head.weight.dtype):
            self.cache = self.model.new_cache(cond_ids.shape[0], device=cond_ids.device)
        self.orders = order.expand(cond_ids.shape[0], -1)
        return self.model.prefill(cond_ids, self.orders, self.cache, group_conditions(cond_ids))[:, None]

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        return self.model.decode_step(tokens[:, 0], step, self.orders, self.cache)[:, None]


class FullRecompute:
    """The reference: re-run the whole prefix every step (O(L^2) work over a sample)."""

    def __init__(self, model: RAR):
        self.model = model

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        self.cond_ids, self.orders = cond_ids, order.expand(cond_ids.shape[0], -1)
        self.tokens = cond_ids.new_empty(cond_ids.shape[0], 0)
        return self.model.prefix_logits(self.tokens, cond_ids, self.orders)[:, -1:]

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        return self.model.prefix_logits(self.tokens, self.cond_ids, self.orders)[:, -1:]


class StaticDecoder:
    """KV-cached decoding for a fixed batch in which every tensor a decode step reads or writes lives at a
    fixed address: the condition ids, the fed-back token, the scan orders, the cache (keys, values and the
    condition embeddings) and the logits. Each batch refills them in place (`start` copies the conditions,
    `step` copies the token), which is exactly what a CUDA-graph replay needs; on its own (any device) it
    runs the same steps eagerly, so tests can check the static layout on CPU.

    The condition grouping is static too: with CFG (`guided`) rows 0..B-1 are the conditional rows, each
    its own group, and rows B..2B-1 the null rows, sharing group B; without CFG every row is its own group.
    """

    def __init__(self, model: RAR, batch: int, guided: bool, order: torch.Tensor):
        self.model, self.batch, self.guided = model, batch, guided
        device = model.lm_head.weight.device
        rows = 2 * batch if guided else batch
        self.rows = rows
        self.cond_ids = torch.full((rows,), model.config.class_offset, dtype=torch.long, device=device)
        if guided:
            self.cond_ids[batch:] = model.config.null_class_id
            self.distinct = torch.empty(batch + 1, dtype=torch.long, device=device)
            self.index = torch.cat([torch.arange(batch, device=device), torch.full((batch,), batch, device=device)])
        else:
            self.distinct, self.index = self.cond_ids, None
        self.orders = order.to(device).expand(rows, -1).contiguous()
        self.token = torch.zeros(rows, dtype=torch.long, device=device)
        self.cache = model.new_cache(rows, device=device)
        self.logits: torch.Tensor | None = None

    def start(self, cond_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        if cond_ids.shape != (self.rows,) or order.shape != self.orders.shape[1:]:
            raise ValueError(f"this static decoder runs {self.rows} rows, got conditions {tuple(cond_ids.shape)}")
        if not torch.equal(order.to(self.orders.device), self.orders[0]):  # once per batch
            raise ValueError("this static decoder was built for another scan order")
        self.cond_ids.copy_(cond_ids)
        if self.guided:
            self.distinct[: self.batch].copy_(cond_ids[: self.batch])
            self.distinct[self.batch:].copy_(cond_ids[self.batch:self.batch + 1])
        return self.model.prefill(self.cond_ids, self.orders, self.cache, (self.distinct, self.index))[:, None]

    def _run(self, step: int) -> torch.Tensor:
        """Decode step `step` from the static buffers into the static logits (rows, 1, V)."""
        self.cache.length = PREFIX + step - 1  # the slot this step writes (replays never read it back)
        out = self.model.decode_step(self.token, step, self.orders, self.cache)
        if self.logits is None:
            self.logits = torch.empty_like(out[:, None])
        self.logits[:, 0].copy_(out)
        return self.logits

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.token.copy_(tokens[:, 0])
        return self._run(step)
