"""The one sampling loop of every generator family, with classifier-free guidance, temperature, top-k and top-p.

`sample` is the loop every caller runs (`vqtok sample`, the training previews, the conformance checks) for
every family (RAR, VAR, LlamaGen). A *step* emits `n_t` tokens: RAR and LlamaGen emit one token per step,
VAR one whole scale (pn^2 tokens). The model says how many (`generation_steps()`); every tensor of the loop
is shaped (rows, n_t, V). Two parts are pluggable:

decoders (what produces each step's logits; each family has its own, built on its model's prefill/decode step)
    start(cond_ids (R,), order (N,) | None) -> logits (R, n_0, V) for step 0
    step(tokens (R, n_{t-1}), t)            -> logits (R, n_t, V), after feeding the tokens drawn at t-1
    RAR's: CachedDecoder (KV cache allocated once per row count), StaticDecoder (every input and output in
    a static buffer refilled in place, the layout CUDA graphs need; vqtok.ar.cuda_graphs.CUDAGraphDecoder
    replays it), FullRecompute (re-runs the whole prefix every step: the slow reference).
draws (how tokens are picked from each step's distributions (B, n_t, V); they return (B, n_t))
    GeneratorDraw   one torch.multinomial call per step on (B * n_t, V) from one torch.Generator (the
                    official samplers' draw: LlamaGen with the global generator, VAR with its own)
    InverseCDFDraw  per-sample uniforms (B, N): token j of row b is the inverse CDF of its distribution at
                    uniforms[b, j], so a sample's tokens do not depend on the batch it is in
    ForcedDraw      returns given tokens (teacher forcing), to expose the exact distributions drawn from

CFG runs the conditional and the null-class rows as one doubled batch (rows 0..B-1 conditional, B..2B-1
null), then mixes `uncond + (cond - uncond) * scale(step)` in float32 before the temperature, as the
official samplers do. VAR's and LlamaGen's cached decoders apply that mix to the input of their linear
head instead (HeadMix: the same in exact arithmetic, half the head's rows). Temperature 0 turns each
distribution into a one-hot of the argmax, which every draw returns. The model returns tokens in its
output order: RAR scatters its scan order back to raster, LlamaGen generates in raster order, VAR's steps
concatenated are the multi-scale token layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from vqtok.errors import UserError

SCHEDULES = ("constant", "linear", "power-cosine", "ramp")


@dataclass
class SamplingConfig:
    guidance_scale: float = 4.0  # 0 disables CFG (as the official code); 1 with "constant" is the same as no CFG
    guidance_schedule: str = "constant"  # constant | linear | power-cosine | ramp
    guidance_power: float = 0.0  # power-cosine exponent; 0 gives a constant scale (0**0 = 1)
    temperature: float = 1.0  # 0 picks the most likely token
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1 keeps every token
    order: str | None = None  # None: the order the model was trained to (its config.order)
    # LlamaGen's cfg_interval: -1 guides every step; k >= 0 guides steps 0..k+1 (the first token and k+1
    # decode steps) and then samples from the conditional rows alone
    guidance_interval: int = -1

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
        if self.guidance_interval < -1:
            raise UserError(f"the guidance interval must be -1 (every step) or >= 0, got {self.guidance_interval}")

    def guided_at(self, step: int) -> bool:
        """Whether step `step` mixes in the null rows (see `guidance_interval`)."""
        return self.uses_cfg and (self.guidance_interval < 0 or step <= self.guidance_interval + 1)

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
    if schedule == "ramp":
        return (scale - 1) * torch.tensor(step / max(num_steps - 1, 1), dtype=torch.float32) + 1
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
    """Set to -inf every logit outside the top k and outside the smallest set with probability mass >= top_p.

    Equal logits: every logit tied with the k-th stays (as in the official samplers); where the top-p boundary
    cuts a group of equal logits, the lowest indices stay (the order of a stable sort), so the kept set does
    not depend on a device's sort. bf16 logits tie like that in most rows; float32 ones almost never do.
    """
    V = logits.shape[-1]
    if top_k and top_k < V:
        ascending = sorted_values(logits)
        kth = ascending[..., V - top_k:V - top_k + 1].contiguous()
        if top_p < 1.0:
            return _top_p_of_top_k(logits, ascending, kth, top_p)
        return keep_at_least(logits, kth)
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it and stays
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sorted_values(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) the values of each row in ascending order (values only: equal values need no order; NaN last).

    On the CPU through numpy, whose vectorized sort is many times faster than torch's there (2048 x 4096
    float32 rows on one core: 20 ms against 370 ms for `torch.sort` and 128 ms for a top-900 `torch.topk`)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(np.sort(logits.numpy(), axis=-1))
    return logits.sort(dim=-1).values


def _top_p_of_top_k(logits: torch.Tensor, ascending: torch.Tensor, kth: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p after top-k from each row's values in ascending order and its k-th largest value: the kept set
    of sorting the whole top-k-masked row (stably) without that sort.

    That sort gives the values >= the k-th (k of them, or more where some tie with the k-th) largest first,
    then -inf. Its softmax is taken over a prefix of it padded with -inf to a multiple of 64 entries, which
    adds the same numbers in the same vector lanes as the softmax of the whole row (the full-sort test
    checks that), and the cumulative mass of the first entries is a prefix of the full cumulative sum. The
    kept entries are the leading ones with mass before them < top_p (a prefix: the mass only grows), ending
    at a value tau: every logit >= tau stays, except where the prefix cuts a group of logits equal to tau;
    there the lowest indices of that group stay, as many as the prefix holds (the common row in bf16).
    Counts of values above and at tau are searches in the sorted row, not scans.
    """
    V = logits.shape[-1]
    at_least_kth = V - torch.searchsorted(ascending, kth)  # k, or more with ties at the k-th
    width = min(V, -(-int(at_least_kth.max()) // 64) * 64)
    head = ascending[..., V - width:].flip(-1)  # largest first
    head.masked_fill_(torch.arange(width, device=logits.device) >= at_least_kth, float("-inf"))
    probs = head.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # the most likely token always has 0 before it and stays
    kept = torch.minimum(torch.count_nonzero(mass_before < top_p, dim=-1)[..., None], at_least_kth)
    tau = head.gather(-1, kept - 1)  # the smallest kept value
    below_or_at = torch.searchsorted(ascending, tau, right=True)
    keep_at_tau = kept - (V - below_or_at)  # kept minus the values above tau
    cut = below_or_at - torch.searchsorted(ascending, tau) > keep_at_tau  # a group of equals cut
    out = keep_at_least(logits, tau)
    if bool(cut.any()):
        _drop_ties_after_the_lowest(out.view(-1, V), tau.reshape(-1), keep_at_tau.masked_fill(~cut, V).reshape(-1))
    return out


def keep_at_least(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`logits` where >= the row's `threshold` (..., 1), else -inf, in float ops only: on the CPU a boolean
    mask (`masked_fill`, `where`) over a (2048, 4096) slab costs 35 ms, these passes 14. Exact in every
    float dtype: t - x <= 0 exactly where x >= t (a difference of unequal floats is never 0), and those
    entries become -inf, the others stay positive; times -inf that is +inf where kept and -inf where not,
    and min(that, x) gives x or -inf. NaN (x = t = +-inf, or a NaN logit) becomes +inf: x stays."""
    inf = float("inf")
    w = threshold - logits
    F.threshold_(w, 0.0, -inf)
    w.mul_(-inf).nan_to_num_(nan=inf, posinf=inf, neginf=-inf)
    return w.clamp_max_(logits)


def _drop_ties_after_the_lowest(x: torch.Tensor, tau: torch.Tensor, keep: torch.Tensor) -> None:
    """In the (R, V) rows `x`, set to -inf every entry equal to the row's `tau` after its first `keep`
    (lowest indices first). In place. On the CPU the positions come from numpy (compare and flatnonzero:
    3 ms over 2048 x 4096 where torch's `==` and `nonzero` take 12)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        flat = torch.from_numpy(np.flatnonzero(x.detach().numpy() == tau.detach().numpy()[:, None]))
        row, col = flat // x.shape[1], flat % x.shape[1]  # row-major: each row's columns ascending
    else:
        row, col = (x == tau[:, None]).nonzero(as_tuple=True)
    first = torch.searchsorted(row, torch.arange(x.shape[0], device=x.device))
    drop = torch.arange(row.numel(), device=x.device) - first[row] >= keep[row]
    x[row[drop], col[drop]] = float("-inf")


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2B, ..., V) logits of [conditional; null] rows -> (B, ..., V) `uncond + (cond - uncond) * scale`, in float32."""
    return HeadMix(scale)(logits.float())  # the same mix, on the logits


@dataclass(frozen=True)
class HeadMix:
    """Classifier-free guidance applied to the input of a linear head instead of its logits.

    Logits are `W a + b` of the head input `a`, so `uncond + (cond - uncond) * s` of the logits equals the
    head of `a_u + (a_c - a_u) * s` (the bias cancels to one bias): the head runs over B rows instead of 2B,
    the same in exact arithmetic, within float rounding of the logits otherwise. `scale` None takes the
    conditional rows alone (a step past the guidance interval).
    """

    scale: float | torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(2B, ..., C) head input of [conditional; null] rows -> (B, ..., C), in x's dtype.

        The mix is computed in float32 (under bf16 autocast too), so a float32 0-dim tensor holding the scale
        (a static decoder's buffer) gives bitwise the result of the Python float."""
        cond, uncond = x.chunk(2)
        if self.scale is None:
            return cond
        u = uncond.float()
        return torch.sub(cond.float(), u).mul_(self.scale).add_(u).to(x.dtype)


class StaticHeadMix:
    """HeadMix whose scale and guided/unguided switch live in 0-dim buffers at fixed addresses (a CUDA
    graph records them once and reads the values of each replay): `set(mix)` loads a HeadMix's setting,
    and the call gives what that HeadMix gives, bitwise."""

    def __init__(self, device) -> None:
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.guided = torch.ones((), dtype=torch.bool, device=device)

    def set(self, mix: HeadMix) -> None:
        self.guided.fill_(mix.scale is not None)
        if mix.scale is not None:
            self.scale.fill_(float(mix.scale))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.guided, HeadMix(self.scale)(x), x.chunk(2)[0])


def load_mix(static: StaticHeadMix | None, mix: HeadMix | None) -> None:
    """Load a step's HeadMix into a static decoder's StaticHeadMix (None: a decoder built without CFG); a
    ValueError when the decoder and the step disagree about guidance."""
    if (mix is not None) != (static is not None):
        raise ValueError(f"this static decoder was built {'with' if static is not None else 'without'} CFG, "
                         f"got {'a' if mix is not None else 'no'} guidance mix")
    if mix is not None:
        static.set(mix)


def token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(..., V) guided logits -> the distributions tokens are drawn from: temperature, then top-k and top-p;
    at temperature 0 a one-hot of the argmax."""
    logits = logits.float()
    if cfg.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    if cfg.temperature != 1:  # x / 1 == x exactly
        logits = logits / cfg.temperature
    return filter_logits(logits, cfg.top_k, cfg.top_p).softmax(dim=-1)


def describe_sampling(cfg: SamplingConfig, num_steps: int) -> str:
    """One line with the resolved guidance schedule, temperature and filters (what `vqtok sample` prints)."""
    if not cfg.uses_cfg:
        guidance = "guidance off" + (" (scale 0)" if cfg.guidance_scale == 0 else " (constant scale 1)")
    else:
        scales = guidance_schedule(cfg, num_steps)
        if cfg.guidance_schedule == "constant":
            guidance = f"guidance constant {cfg.guidance_scale:g}"
        else:
            shape = (f"power-cosine, power {cfg.guidance_power:g}" if cfg.guidance_schedule == "power-cosine"
                     else cfg.guidance_schedule)
            guidance = (f"guidance {shape}, scale {cfg.guidance_scale:g} "
                        f"(step 0: {scales[0].item():.3g}, middle: {scales[num_steps // 2].item():.3g}, "
                        f"last: {scales[-1].item():.3g})")
    temperature = "temperature 0 (argmax)" if cfg.temperature == 0 else f"temperature {cfg.temperature:g}"
    top_k = f"top-k {cfg.top_k}" if cfg.top_k else "top-k off"
    top_p = f"top-p {cfg.top_p:g}" if cfg.top_p < 1 else "top-p off"
    order = f", order {cfg.order}" if cfg.order else ""
    if cfg.uses_cfg and cfg.guidance_interval >= 0:
        guidance += f", steps 0..{cfg.guidance_interval + 1} only"
    return f"{guidance}; {temperature}; {top_k}; {top_p}{order}"


# ------------------------------------------------------------------------------------------- draws


class Draw(Protocol):
    def __call__(self, probs: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        """Tokens (B, n) for the step's distributions (B, n, V) (float32, rows sum to 1); `offset` is the
        position of the step's first token among the sample's N tokens, in generation order."""


class GeneratorDraw:
    """One `torch.multinomial` call per step on (B * n, V) from one generator for the batch (None: torch's
    default generator)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, probs: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        if self.generator is not None and self.generator.device.type != probs.device.type:
            raise UserError(f"the sampling generator is on {self.generator.device} but the model is on {probs.device}")
        B, n, V = probs.shape
        return torch.multinomial(probs.reshape(B * n, V), 1, generator=self.generator).view(B, n)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row at the inverse CDF of (..., V) `probs` at `uniforms` (...) in [0, 1), in float64.

    Equivalent in distribution to `torch.multinomial` on the same probabilities. The token is the first
    whose cumulative mass (in vocabulary order, summed in float64) exceeds `u * total`, so zero-probability
    tokens (flat stretches of the CDF) are never chosen. For a wide vocabulary the search runs in two levels
    (`_two_level_inverse_cdf`), which finds the same token without a float64 copy of the whole row.
    """
    V = probs.shape[-1]
    block = _cdf_block(V)
    if block:
        lead = probs.shape[:-1]
        return _two_level_inverse_cdf(probs.reshape(-1, V), uniforms.reshape(-1), block).view(lead)
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64)[..., None] * cdf[..., -1:]
    token = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True)[..., 0]
    return token.clamp_max(V - 1)


def _cdf_block(V: int) -> int:
    """Block width of the two-level inverse CDF for a V-token vocabulary: the power of two nearest sqrt(V)
    that divides V (at least 16), or 0 (one level) for a narrow vocabulary."""
    if V < 256:
        return 0
    block = 1 << round(math.log2(V) / 2)
    while block >= 16 and V % block:
        block //= 2
    return block if block >= 16 else 0


def _block_masses(probs: torch.Tensor, block: int) -> torch.Tensor:
    """(R, V) float32 probabilities -> (R, V // block) float64 sums of each block. On CPU through numpy,
    whose float32 -> float64 reduction is several times faster than torch's there (which converts first)."""
    R, V = probs.shape
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        blocks = probs.detach().contiguous().numpy().reshape(R, V // block, block)
        return torch.from_numpy(np.add.reduce(blocks, axis=-1, dtype=np.float64))
    return probs.reshape(R, V // block, block).sum(dim=-1, dtype=torch.float64)


def _two_level_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, block: int) -> torch.Tensor:
    """`inverse_cdf` of (R, V) rows: the float64 masses of blocks of `block` tokens locate the block where the
    cumulative mass first exceeds the target, and the cumulative sum of that block alone gives the token.

    The token is the one of the one-level search: float32 probabilities of at least 2^-29 are multiples of
    2^-52, so a row of them (total below 2) sums exactly in float64 in any order, and each block's cumulative
    mass is the one-level CDF at its last token. Rows holding smaller probabilities can differ only where `u * total` falls within float64
    rounding of a CDF step."""
    R, V = probs.shape
    nb = V // block
    block_cdf = _block_masses(probs, block).to(probs.device).cumsum_(dim=-1)
    target = uniforms.to(probs.device, torch.float64)[:, None] * block_cdf[:, -1:]
    b = torch.searchsorted(block_cdf, target, right=True).clamp_max_(nb - 1)  # (R, 1)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
    rows = probs.reshape(R, nb, block).gather(1, b[:, :, None].expand(R, 1, block))[:, 0]
    cdf = rows.double().cumsum_(dim=-1).add_(before)
    j = torch.searchsorted(cdf, target, right=True).clamp_max_(block - 1)
    return (b * block + j)[:, 0]


class InverseCDFDraw:
    """Token j of row b is the inverse CDF of its distribution at uniforms[b, j] ((B, N) in [0, 1))."""

    def __init__(self, uniforms: torch.Tensor):
        self.uniforms = uniforms

    def __call__(self, probs: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        if self.uniforms.shape[0] != probs.shape[0]:
            raise ValueError(f"{self.uniforms.shape[0]} rows of uniforms for a batch of {probs.shape[0]}")
        if self.uniforms.device != probs.device:  # moved once, on the first step
            self.uniforms = self.uniforms.to(probs.device)
        return inverse_cdf(probs, self.uniforms[:, offset:offset + probs.shape[1]])


class ForcedDraw:
    """Teacher forcing: returns tokens[:, offset:offset + n] of the given (B, N) tokens in generation order."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __call__(self, probs: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        return self.tokens[:, offset:offset + probs.shape[1]].to(probs.device)


def draw_tokens(logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws (...) from (..., V) guided logits at `uniforms` (...): what InverseCDFDraw does per step."""
    return inverse_cdf(token_probs(logits, cfg), uniforms)


# ---------------------------------------------------------------------------------------- decoders


class Decoder(Protocol):
    def start(self, cond_ids: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """Begin a batch of condition rows (R,), generating in `order` ((N,) raster position of each
        generated token; None for families with one fixed order); logits for step 0 (R, n_0, V)."""

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed the tokens (R, n_{step-1}) drawn at step-1 of every row; logits for step `step` (R, n_step, V)."""

    # A decoder with `guides_before_head = True` also takes `mix` (a HeadMix) under CFG: `start(cond_ids
    # (2B,), order, mix)` and `step(tokens (B, n), step, mix)` (the drawn tokens, fed to both halves) then
    # return the guided logits (B, n, V) of the mix applied before the head; without `mix` they behave as
    # above. The loop guides the logits of every other decoder itself.


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def attention_dtype(device: torch.device | str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype attention computes in on `device`: autocast's when it is on there (SDPA casts its inputs to
    it), else the weights'. KV caches store keys and values in it, so no step re-casts the cached prefix."""
    device_type = torch.device(device).type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def cache_fits(cache, rows: int, device: torch.device, weight_dtype: torch.dtype) -> bool:
    """Whether a decoder's KV cache (keys per layer in `cache.k`, rows first; None: none yet) serves a batch
    of `rows` rows on `device` in the attention dtype of `weight_dtype` weights there: decoders keep their
    cache across batches and build a new one when the row count, the device or the precision changes."""
    if cache is None:
        return False
    k = cache.k[0]
    return (k.shape[0], k.device, k.dtype) == (rows, torch.device(device), attention_dtype(device, weight_dtype))


# ------------------------------------------------------------------------------------------- loop


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, N) in the model's output order, ready for the tokenizer's decode
    probs: torch.Tensor | None = None  # (B, N, V) in generation order, when asked for


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    class_ids: torch.Tensor,
    cfg: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    forced_tokens: torch.Tensor | None = None,
    return_probs: bool = False,
    draw: Draw | None = None,
    decoder: Decoder | None = None,
) -> SampleOutput:
    """Generate (B, N) tokens for raw class ids (B,) with any generator family.

    The model provides `generation_steps()` (tokens per step), `generation_order(name)` ((N,) raster
    position of each generated token, or None when generation order is the output order),
    `condition_ids` / `null_condition_ids`, and `default_decoder(kv_cache)`. `draw` picks the tokens
    (default: GeneratorDraw(generator), or ForcedDraw for `forced_tokens`); `decoder` produces each step's
    logits (default: the family's cached decoder, or its full-recompute reference with `kv_cache=False`).
    `forced_tokens` (B, N, output order) replaces each draw by the given tokens, which with `return_probs`
    exposes the exact distributions the sampler drew from.
    """
    cfg = cfg or SamplingConfig()
    device = model_device(model)
    class_ids = class_ids.to(device)
    B = class_ids.shape[0]
    steps = model.generation_steps()
    N = sum(steps)
    order = model.generation_order(cfg.order)
    order = order.to(device) if order is not None else None
    if draw is not None and (generator is not None or forced_tokens is not None):
        raise ValueError("give either a draw or generator/forced_tokens, not both")
    built_for = (getattr(decoder, "batch", None), getattr(decoder, "guided", None))
    if built_for[0] is not None and built_for != (B, cfg.uses_cfg):
        raise ValueError(f"the static decoder was built for batch {built_for[0]} (CFG {built_for[1]}), "
                         f"got batch {B} (CFG {cfg.uses_cfg})")

    cond_ids = model.condition_ids(class_ids)
    if cfg.uses_cfg:
        cond_ids = torch.cat([cond_ids, model.null_condition_ids(B, device)])
        scales = guidance_schedule(cfg, len(steps)).tolist()
    if draw is None:
        if forced_tokens is not None:
            forced = forced_tokens.to(device)
            draw = ForcedDraw(forced.gather(1, order.expand(B, N)) if order is not None else forced)
        else:
            draw = GeneratorDraw(generator)
    if decoder is None:
        decoder = model.default_decoder(kv_cache)
    in_head = cfg.uses_cfg and getattr(decoder, "guides_before_head", False)  # the decoder mixes the rows

    def mix(step: int) -> dict:
        return {"mix": HeadMix(scales[step] if cfg.guided_at(step) else None)} if in_head else {}

    generated = torch.empty(B, N, dtype=torch.long, device=device)
    probs_out = None
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        logits = decoder.start(cond_ids, order, **mix(0))
        offset = 0
        for step, n in enumerate(steps):
            if step:
                fed = torch.cat([tokens, tokens]) if cfg.uses_cfg and not in_head else tokens
                logits = decoder.step(fed, step, **mix(step))
            if logits.shape[1] != n:
                raise ValueError(f"step {step} should give logits for {n} tokens, the decoder gave {logits.shape[1]}")
            if in_head:
                logits = logits.float()
            elif cfg.uses_cfg:  # the doubled batch runs at every step; past the interval only its conditional rows count
                logits = guide(logits, scales[step]) if cfg.guided_at(step) else logits[:B].float()
            probs = token_probs(logits, cfg)
            if return_probs:
                if probs_out is None:
                    probs_out = torch.empty(B, N, probs.shape[-1], device=device)
                probs_out[:, offset:offset + n] = probs
            tokens = draw(probs, step, offset)
            generated[:, offset:offset + n] = tokens
            offset += n
    finally:
        model.train(was_training)
    if order is not None:
        generated = torch.empty_like(generated).scatter_(1, order.expand(B, N), generated)
    return SampleOutput(tokens=generated, probs=probs_out)
