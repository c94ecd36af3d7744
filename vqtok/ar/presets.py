"""Named RAR sizes and the paper's sampling settings for each.

Sizes are the official ones (the README_RAR.md table of bytedance/1d-tokenizer); `rar-tiny` is a CPU-sized model for tests and
demos. Sampling presets are the README/paper values per size: temperature, the
power-cosine guidance scale and its power.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from vqtok.ar.rar import RARConfig
from vqtok.ar.sampling import SamplingConfig


def _size(hidden: int, depth: int, heads: int, intermediate: int) -> Callable[[], RARConfig]:
    return lambda: RARConfig(hidden_size=hidden, depth=depth, num_heads=heads, intermediate_size=intermediate)


PRESETS: dict[str, Callable[[], RARConfig]] = {
    "rar-b": _size(768, 24, 16, 3072),
    "rar-l": _size(1024, 24, 16, 4096),
    "rar-xl": _size(1280, 32, 16, 5120),
    "rar-xxl": _size(1408, 40, 16, 6144),
    # ~0.54M parameters (most in the official-size positional tables): the fixture's shape
    "rar-tiny": _size(64, 2, 4, 256),
}

SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    "rar-b": SamplingConfig(guidance_scale=16.0, guidance_schedule="power-cosine", guidance_power=2.75, temperature=1.0),
    "rar-l": SamplingConfig(guidance_scale=15.5, guidance_schedule="power-cosine", guidance_power=2.5, temperature=1.02),
    "rar-xl": SamplingConfig(guidance_scale=6.9, guidance_schedule="power-cosine", guidance_power=1.5, temperature=1.02),
    "rar-xxl": SamplingConfig(guidance_scale=8.0, guidance_schedule="power-cosine", guidance_power=1.2, temperature=1.02),
    # VAR (every size): the FoundationVision/VAR README's FID setting, autoregressive_infer_cfg(cfg=1.5,
    # top_p=0.96, top_k=900, more_smooth=False); its cfg c ramps 0 -> c over the scales, i.e. vqtok's
    # "ramp" schedule with scale 1 + c
    **{f"var-d{d}": SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp", top_k=900, top_p=0.96)
       for d in (16, 20, 24, 30)},
    # LlamaGen c2i, the FID settings the FoundationVision/LlamaGen release publishes: its sampling commands'
    # --cfg-scale per size, and its DDP sampler's defaults for the rest (top-k 0 and top-p 1.0, both off;
    # temperature 1.0; cfg-interval -1, i.e. a constant scale at every step)
    **{f"llamagen-{size}": SamplingConfig(guidance_scale=scale, guidance_schedule="constant", temperature=1.0, top_k=0, top_p=1.0)
       for size, scale in {"b": 2.0, "l": 2.0, "xl": 1.75, "xxl": 1.75, "3b": 1.65}.items()},
}


def get_preset(name: str) -> RARConfig:
    if name not in PRESETS:
        from vqtok.errors import UserError

        raise UserError(f"unknown generator preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def paper_sampling(name: str) -> SamplingConfig:
    """The paper's sampling settings for a size preset (a fresh copy)."""
    if name not in SAMPLING_PRESETS:
        from vqtok.errors import UserError

        raise UserError(f"no paper sampling settings for '{name}'; they exist for {', '.join(SAMPLING_PRESETS)}")
    return dataclasses.replace(SAMPLING_PRESETS[name])


def preset_for(cfg: RARConfig) -> str | None:
    """The preset whose architecture `cfg` has (ignoring dropout/order settings), or None."""
    if not isinstance(cfg, RARConfig):  # other families name their presets themselves (identity_fields)
        return None
    arch = ("hidden_size", "depth", "num_heads", "intermediate_size", "vocab_size", "seq_len", "num_classes")
    for name, make in PRESETS.items():
        ref = make()
        if all(getattr(ref, k) == getattr(cfg, k) for k in arch):
            return name
    return None
