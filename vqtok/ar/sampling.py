"""Sampling from RAR: KV-cached decoding with classifier-free guidance, temperature, top-k and top-p.

One step per image token. The cached decoder allocates the keys/values for the whole sequence once,
prefills [cls, cond], then embeds and runs only the newest token each step. `kv_cache=False` recomputes
the full prefix every step instead: the slow reference the cached path is tested against.

CFG runs the conditional and the null-class rows as one doubled batch (the null row is both the input
condition token and the adaLN condition), then mixes `uncond + (cond - uncond) * scale(step)` before the
temperature, as the official `generate` does (reference rar.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqtok.ar.orders import scan_order
from vqtok.ar.rar import RAR
from vqtok.errors import UserError

SCHEDULES = ("constant", "linear", "power-cosine")


@dataclass
class SamplingConfig:
    guidance_scale: float = 4.0  # 0 disables CFG (as the official code); 1 with "constant" is the same as no CFG
    guidance_schedule: str = "constant"  # constant | linear | power-cosine
    guidance_power: float = 0.0  # power-cosine exponent; 0 gives a constant scale (0**0 = 1)
    temperature: float = 1.0  # 0 picks the most likely token
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1 keeps every token
    order: str | None = None  # None: the order the model was trained to (its config.order)

    def __post_init__(self):
        if self.guidance_schedule not in SCHEDULES:
            raise UserError(f"unknown guidance schedule '{self.guidance_schedule}'; choose one of {', '.join(SCHEDULES)}")
        if self.guidance_scale < 0 or self.guidance_power < 0:
            raise UserError("guidance scale and power must be >= 0")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 0 and not (self.guidance_schedule == "constant" and self.guidance_scale == 1)


def guidance_scale_at(step: int, num_steps: int, scale: float, schedule: str = "constant", power: float = 0.0) -> torch.Tensor:
    """The CFG scale of one step as a float32 scalar tensor.

    power-cosine is the official formula, in float32 torch ops as `generate` computes it:
    `(scale - 1) * (1 - cos(((step / num_steps) ** power) * pi)) / 2 + 1`. step/num_steps never reaches 1,
    and power 0 gives `scale` at every step, step 0 included.
    """
    if schedule == "constant":
        return torch.tensor(scale, dtype=torch.float32)
    if schedule == "linear":
        return (scale - 1) * torch.tensor(step / num_steps, dtype=torch.float32) + 1
    if schedule == "power-cosine":
        p = torch.ones(1, dtype=torch.float32) * power
        ramp = (1 - torch.cos(((step / num_steps) ** p) * math.pi)) * 0.5
        return ((scale - 1) * ramp + 1)[0]
    raise UserError(f"unknown guidance schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")


def guidance_schedule(cfg: SamplingConfig, num_steps: int) -> torch.Tensor:
    """(num_steps,) float32 CFG scale per step."""
    return torch.stack([guidance_scale_at(t, num_steps, cfg.guidance_scale, cfg.guidance_schedule, cfg.guidance_power)
                        for t in range(num_steps)])


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with probability mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it and stays
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class _CachedDecoder:
    """Logits for each step from a preallocated KV cache: prefill [cls, cond], then one token per step."""

    def __init__(self, model: RAR, cond_ids: torch.Tensor, orders: torch.Tensor):
        self.model, self.cond_ids, self.orders = model, cond_ids, orders
        self.cache = model.new_cache(cond_ids.shape[0], device=cond_ids.device)
        self.cond_emb = model.embeddings(cond_ids)

    def logits(self, step: int, prev: torch.Tensor | None) -> torch.Tensor:
        if step == 0:
            return self.model.prefill(self.cond_ids, self.orders, self.cache)
        return self.model.decode_step(prev, step, self.cond_emb, self.orders, self.cache)


class _FullRecompute:
    """The reference: re-run the whole prefix every step (O(L^2) work over a sample)."""

    def __init__(self, model: RAR, cond_ids: torch.Tensor, orders: torch.Tensor):
        self.model, self.cond_ids, self.orders = model, cond_ids, orders
        self.tokens = cond_ids.new_empty(cond_ids.shape[0], 0)

    def logits(self, step: int, prev: torch.Tensor | None) -> torch.Tensor:
        if step > 0:
            self.tokens = torch.cat([self.tokens, prev[:, None]], dim=1)
        return self.model.prefix_logits(self.tokens, self.cond_ids, self.orders)[:, -1]


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, N) raster order, ready for the tokenizer's decode
    probs: torch.Tensor | None = None  # (B, N, V) in generation order, when asked for


@torch.no_grad()
def sample(
    model: RAR,
    class_ids: torch.Tensor,
    cfg: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    forced_tokens: torch.Tensor | None = None,
    return_probs: bool = False,
) -> SampleOutput:
    """Generate (B, N) raster-order tokens for raw class ids (B,).

    `generator` (on the model's device) makes sampling reproducible. `forced_tokens` (B, N, raster order)
    replaces each draw by the given token (teacher forcing), which with `return_probs` exposes the exact
    distributions the sampler drew from; the conformance check uses it.
    """
    cfg = cfg or SamplingConfig()
    mcfg = model.config
    device = model.lm_head.weight.device
    class_ids = class_ids.to(device)
    B, N = class_ids.shape[0], mcfg.seq_len
    order = scan_order(cfg.order or mcfg.order, *mcfg.grid_shape).to(device)
    if generator is not None and generator.device.type != device.type:
        raise UserError(f"the sampling generator is on {generator.device} but the model is on {device}")

    cond_ids = model.condition_ids(class_ids)
    if cfg.uses_cfg:
        cond_ids = torch.cat([cond_ids, model.null_condition_ids(B, device)])
        scales = guidance_schedule(cfg, N).to(device)
    orders = order.expand(cond_ids.shape[0], N)
    forced = forced_tokens.to(device).gather(1, orders[:B]) if forced_tokens is not None else None
    generated = torch.empty(B, N, dtype=torch.long, device=device)
    probs_out = torch.empty(B, N, mcfg.vocab_size, device=device) if return_probs else None
    prev = None
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        decoder = (_CachedDecoder if kv_cache else _FullRecompute)(model, cond_ids, orders)
        for step in range(N):
            logits = decoder.logits(step, prev).float()
            if cfg.uses_cfg:
                cond, uncond = logits.chunk(2)
                logits = uncond + (cond - uncond) * scales[step]
            if cfg.temperature > 0:
                logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
                probs = logits.softmax(dim=-1)
            else:
                probs = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
            if probs_out is not None:
                probs_out[:, step] = probs
            if forced is not None:
                token = forced[:, step]
            elif cfg.temperature > 0:
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(dim=-1)
            generated[:, step] = token
            prev = torch.cat([token, token]) if cfg.uses_cfg else token
    finally:
        model.train(was_training)
    raster = torch.empty_like(generated).scatter_(1, orders[:B], generated)
    return SampleOutput(tokens=raster, probs=probs_out)
