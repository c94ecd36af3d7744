"""Sampling from RAR: the one sampling loop, with classifier-free guidance, temperature, top-k and top-p.

`sample` is the loop every caller runs (`vqtok sample`, the training previews, the conformance checks):
one step per image token over a *decoder* (what produces each step's logits) and a *draw* (how a token is
picked from each step's distribution). Both are pluggable:

decoders
    CachedDecoder   the KV cache allocated once per batch size; prefill [cls, cond], then one token per step
    StaticDecoder   the same with every input and output in a static buffer refilled in place (the
                    layout CUDA graphs need; vqtok.ar.cuda_graphs.CUDAGraphDecoder replays it)
    FullRecompute   re-runs the whole prefix every step: the slow reference the cached paths are tested against
draws
    GeneratorDraw   torch.multinomial from one torch.Generator for the whole batch (the official sampler's draw)
    InverseCDFDraw  per-sample uniforms (B, N): row b takes the inverse CDF of its distribution at
                    uniforms[b, step], so a sample's tokens do not depend on the batch it is in
    ForcedDraw      returns given tokens (teacher forcing), to expose the exact distributions drawn from

CFG runs the conditional and the null-class rows as one doubled batch (the null row is both the input
condition token and the adaLN condition), then mixes `uncond + (cond - uncond) * scale(step)` before the
temperature, as the official `generate` does. Temperature 0 turns each step's
distribution into a one-hot of the argmax, which every draw returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from vqtok.ar.orders import scan_order
from vqtok.ar.rar import PREFIX, RAR, KVCache, group_conditions
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


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2B, V) logits of [conditional; null] rows -> (B, V) `uncond + (cond - uncond) * scale`, in float32."""
    cond, uncond = logits.float().chunk(2)
    return uncond + (cond - uncond) * scale


def token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) guided logits -> the distribution a token is drawn from: temperature, then top-k and top-p;
    at temperature 0 a one-hot of the argmax."""
    logits = logits.float()
    if cfg.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)


def describe_sampling(cfg: SamplingConfig, num_steps: int) -> str:
    """One line with the resolved guidance schedule, temperature and filters (what `vqtok sample` prints)."""
    if not cfg.uses_cfg:
        guidance = "guidance off" + (" (scale 0)" if cfg.guidance_scale == 0 else " (constant scale 1)")
    else:
        scales = guidance_schedule(cfg, num_steps)
        if cfg.guidance_schedule == "constant":
            guidance = f"guidance constant {cfg.guidance_scale:g}"
        else:
            shape = f"power-cosine, power {cfg.guidance_power:g}" if cfg.guidance_schedule == "power-cosine" else "linear"
            guidance = (f"guidance {shape}, scale {cfg.guidance_scale:g} "
                        f"(step 0: {scales[0].item():.3g}, middle: {scales[num_steps // 2].item():.3g}, "
                        f"last: {scales[-1].item():.3g})")
    temperature = "temperature 0 (argmax)" if cfg.temperature == 0 else f"temperature {cfg.temperature:g}"
    top_k = f"top-k {cfg.top_k}" if cfg.top_k else "top-k off"
    top_p = f"top-p {cfg.top_p:g}" if cfg.top_p < 1 else "top-p off"
    order = f", order {cfg.order}" if cfg.order else ""
    return f"{guidance}; {temperature}; {top_k}; {top_p}{order}"


# ------------------------------------------------------------------------------------------- draws


class Draw(Protocol):
    def __call__(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        """One token (B,) from the step's distributions (B, V) (float32, rows sum to 1)."""


class GeneratorDraw:
    """`torch.multinomial` from one generator for the batch (None: torch's default generator)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        if self.generator is not None and self.generator.device.type != probs.device.type:
            raise UserError(f"the sampling generator is on {self.generator.device} but the model is on {probs.device}")
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row at the inverse CDF of (B, V) `probs` at `uniforms` (B,) in [0, 1), in float64.

    Equivalent in distribution to `torch.multinomial` on the same probabilities.
    """
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    # right=True: the first token whose cumulative mass exceeds the target, so zero-probability tokens
    # (flat stretches of the CDF) are never chosen
    token = torch.searchsorted(cdf, target, right=True)[:, 0]
    return token.clamp_max(probs.shape[-1] - 1)


class InverseCDFDraw:
    """Row b's token at step t is the inverse CDF of its distribution at uniforms[b, t] ((B, N) in [0, 1))."""

    def __init__(self, uniforms: torch.Tensor):
        self.uniforms = uniforms

    def __call__(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        if self.uniforms.shape[0] != probs.shape[0]:
            raise ValueError(f"{self.uniforms.shape[0]} rows of uniforms for a batch of {probs.shape[0]}")
        if self.uniforms.device != probs.device:  # moved once, on the first step
            self.uniforms = self.uniforms.to(probs.device)
        return inverse_cdf(probs, self.uniforms[:, step])


class ForcedDraw:
    """Teacher forcing: returns tokens[:, step] of the given (B, N) tokens in generation order."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __call__(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        return self.tokens[:, step].to(probs.device)


def draw_tokens(logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """One inverse-CDF draw (B,) from (B, V) guided logits at `uniforms` (B,): what InverseCDFDraw does per step."""
    return inverse_cdf(token_probs(logits, cfg), uniforms)


# ---------------------------------------------------------------------------------------- decoders


class Decoder(Protocol):
    def start(self, cond_ids: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Begin a batch of condition rows (R,) in generation orders (R, N); logits for token 0 (R, V)."""

    def step(self, token: torch.Tensor, step: int) -> torch.Tensor:
        """Feed token `step-1` (R,) of every row; logits for token `step` (R, V)."""


class CachedDecoder:
    """Eager KV-cached decoding; the cache is allocated once per row count and reused across batches.

    Conditions are grouped at prefill from the batch's condition ids (`group_conditions`), so rows that
    share a class (every null row under CFG) share the adaLN modulation.
    """

    def __init__(self, model: RAR):
        self.model = model
        self.cache: KVCache | None = None

    def start(self, cond_ids: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        if self.cache is None or self.cache.batch != cond_ids.shape[0]:
            self.cache = self.model.new_cache(cond_ids.shape[0], device=cond_ids.device)
        self.orders = orders
        return self.model.prefill(cond_ids, orders, self.cache, group_conditions(cond_ids))

    def step(self, token: torch.Tensor, step: int) -> torch.Tensor:
        return self.model.decode_step(token, step, self.orders, self.cache)


class FullRecompute:
    """The reference: re-run the whole prefix every step (O(L^2) work over a sample)."""

    def __init__(self, model: RAR):
        self.model = model

    def start(self, cond_ids: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        self.cond_ids, self.orders = cond_ids, orders
        self.tokens = cond_ids.new_empty(cond_ids.shape[0], 0)
        return self.model.prefix_logits(self.tokens, cond_ids, orders)[:, -1]

    def step(self, token: torch.Tensor, step: int) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
        return self.model.prefix_logits(self.tokens, self.cond_ids, self.orders)[:, -1]


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

    def start(self, cond_ids: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        if cond_ids.shape != (self.rows,) or orders.shape != self.orders.shape:
            raise ValueError(f"this static decoder runs {self.rows} rows, got conditions {tuple(cond_ids.shape)}")
        if not torch.equal(orders, self.orders):  # once per batch: the steps read the static orders
            raise ValueError("this static decoder was built for another scan order")
        self.cond_ids.copy_(cond_ids)
        if self.guided:
            self.distinct[: self.batch].copy_(cond_ids[: self.batch])
            self.distinct[self.batch:].copy_(cond_ids[self.batch:self.batch + 1])
        return self.model.prefill(self.cond_ids, self.orders, self.cache, (self.distinct, self.index))

    def _run(self, step: int) -> torch.Tensor:
        """Decode step `step` from the static buffers into the static logits."""
        self.cache.length = PREFIX + step - 1  # the slot this step writes (replays never read it back)
        out = self.model.decode_step(self.token, step, self.orders, self.cache)
        if self.logits is None:
            self.logits = torch.empty_like(out)
        self.logits.copy_(out)
        return self.logits

    def step(self, token: torch.Tensor, step: int) -> torch.Tensor:
        self.token.copy_(token)
        return self._run(step)


# ------------------------------------------------------------------------------------------- loop


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
    draw: Draw | None = None,
    decoder: Decoder | None = None,
) -> SampleOutput:
    """Generate (B, N) raster-order tokens for raw class ids (B,).

    `draw` picks each token (default: GeneratorDraw(generator), or ForcedDraw for `forced_tokens`);
    `decoder` produces each step's logits (default: a CachedDecoder, or FullRecompute with
    `kv_cache=False`). `forced_tokens` (B, N, raster order) replaces each draw by the given token, which
    with `return_probs` exposes the exact distributions the sampler drew from.
    """
    cfg = cfg or SamplingConfig()
    mcfg = model.config
    device = model.lm_head.weight.device
    class_ids = class_ids.to(device)
    B, N = class_ids.shape[0], mcfg.seq_len
    order = scan_order(cfg.order or mcfg.order, *mcfg.grid_shape).to(device)
    if draw is not None and (generator is not None or forced_tokens is not None):
        raise ValueError("give either a draw or generator/forced_tokens, not both")
    if isinstance(decoder, StaticDecoder) and (decoder.batch, decoder.guided) != (B, cfg.uses_cfg):
        raise ValueError(f"the static decoder was built for batch {decoder.batch} (CFG {decoder.guided}), "
                         f"got batch {B} (CFG {cfg.uses_cfg})")

    cond_ids = model.condition_ids(class_ids)
    if cfg.uses_cfg:
        cond_ids = torch.cat([cond_ids, model.null_condition_ids(B, device)])
        scales = guidance_schedule(cfg, N).tolist()
    orders = order.expand(cond_ids.shape[0], N)
    if draw is None:
        draw = ForcedDraw(forced_tokens.to(device).gather(1, orders[:B])) if forced_tokens is not None else GeneratorDraw(generator)
    if decoder is None:
        decoder = CachedDecoder(model) if kv_cache else FullRecompute(model)
    generated = torch.empty(B, N, dtype=torch.long, device=device)
    probs_out = torch.empty(B, N, mcfg.vocab_size, device=device) if return_probs else None
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        logits = decoder.start(cond_ids, orders)
        for step in range(N):
            if step:
                logits = decoder.step(torch.cat([token, token]) if cfg.uses_cfg else token, step)
            probs = token_probs(guide(logits, scales[step]) if cfg.uses_cfg else logits, cfg)
            if probs_out is not None:
                probs_out[:, step] = probs
            token = draw(probs, step)
            generated[:, step] = token
    finally:
        model.train(was_training)
    raster = torch.empty_like(generated).scatter_(1, orders[:B], generated)
    return SampleOutput(tokens=raster, probs=probs_out)
