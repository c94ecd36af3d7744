"""Typed configuration of a tokenizer: autoencoder section, quantizer section, pixel range.

    preset: tiny-vqgan            # the preset it came from ("" for a custom architecture)
    resolution: 64                # training / nominal image size (encode takes any multiple of the downsample)
    value_range: [-1.0, 1.0]      # pixel range the model itself works in; the facade always speaks [0, 1]
    autoencoder: {style: llamagen, ch: 32, ch_mult: [1, 2, 2, 4], ...}
    quantizer:
      kind: vq                    # vq | fsq | lfq | msvq
      params: {codebook_size: 256, dim: 8, ...}   # the quantizer's own config dataclass, checked on build

The quantizer parameters are validated against the quantizer module's own config dataclass (owned by
the quantizers), so every key is still checked and `to_dict` writes the fully resolved values.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from vqtok.config import from_dict, to_dict
from vqtok.errors import ConfigError

STYLES = ("maskgit", "var", "llamagen")


@dataclass
class AutoencoderConfig:
    style: Literal["maskgit", "var", "llamagen"] = "llamagen"
    in_channels: int = 3
    ch: int = 128                          # width of level 0; level i is ch * ch_mult[i]
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2                # encoder residual blocks per level
    decoder_num_res_blocks: int | None = None  # None: maskgit = num_res_blocks, var/llamagen = num_res_blocks + 1
    z_channels: int = 256                  # encoder output / decoder input channels
    attention: bool = True                 # self-attention after each block of the lowest level (var/llamagen)
    mid_attention: bool = True             # self-attention in the middle block (var/llamagen)
    quant_conv_kernel: int = 1             # 0: no quant/post-quant convs (maskgit); 1 (LlamaGen) or 3 (VAR)
    dropout: float = 0.0

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def decoder_blocks_per_level(self) -> int:
        if self.decoder_num_res_blocks is not None:
            return self.decoder_num_res_blocks
        return self.num_res_blocks + (0 if self.style == "maskgit" else 1)

    def validate(self) -> None:
        if self.style not in STYLES:
            raise ConfigError(f"autoencoder.style must be one of {', '.join(STYLES)}; got '{self.style}'")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ConfigError("autoencoder.ch_mult must be a non-empty list of positive integers")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ConfigError(f"autoencoder widths ch * ch_mult must be multiples of 32 (GroupNorm groups); got {bad[0]}")
        if self.num_res_blocks < 1 or self.decoder_blocks_per_level < 1:
            raise ConfigError("autoencoder needs at least one residual block per level")
        if self.z_channels < 1 or self.in_channels < 1:
            raise ConfigError("autoencoder.z_channels and in_channels must be positive")
        if self.quant_conv_kernel not in (0, 1, 3):
            raise ConfigError(f"autoencoder.quant_conv_kernel must be 0, 1 or 3; got {self.quant_conv_kernel}")
        if self.style == "maskgit" and (self.attention or self.mid_attention):
            raise ConfigError("the maskgit autoencoder style has no attention; set attention and mid_attention to false")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"autoencoder.dropout must lie in [0, 1); got {self.dropout}")


# kind -> (module, quantizer class, config dataclass); the classes belong to the quantizer modules.
QUANTIZER_KINDS: dict[str, tuple[str, str, str]] = {
    "vq": ("vqtok.tokenizer.quantizers.vq", "VectorQuantizer", "VQConfig"),
    "fsq": ("vqtok.tokenizer.quantizers.fsq", "FSQ", "FSQConfig"),
    "lfq": ("vqtok.tokenizer.quantizers.lfq", "LFQ", "LFQConfig"),
    "msvq": ("vqtok.tokenizer.quantizers.multiscale", "MultiScaleResidualVQ", "MultiScaleVQConfig"),
}


@dataclass
class QuantizerConfig:
    kind: Literal["vq", "fsq", "lfq", "msvq"] = "vq"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerConfig:
    preset: str = ""
    resolution: int = 256
    value_range: tuple[float, float] = (0.0, 1.0)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def downsample(self) -> int:
        return self.autoencoder.downsample

    def validate(self, where: str = "") -> None:
        self.autoencoder.validate()
        lo, hi = self.value_range
        if not hi > lo:
            raise ConfigError(f"value_range must be [low, high] with high > low; got {list(self.value_range)}")
        if self.resolution < self.downsample or self.resolution % self.downsample:
            raise ConfigError(
                f"resolution {self.resolution} must be a positive multiple of the downsample factor {self.downsample}"
            )
        quantizer_config(self.quantizer, f"{where}.quantizer.params" if where else "quantizer.params")  # every parameter


def quantizer_classes(kind: str) -> tuple[type, type]:
    """(quantizer class, its config dataclass) for a quantizer kind."""
    if kind not in QUANTIZER_KINDS:
        raise ConfigError(f"quantizer.kind must be one of {', '.join(QUANTIZER_KINDS)}; got '{kind}'")
    module_name, cls_name, cfg_name = QUANTIZER_KINDS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), getattr(module, cfg_name)


def quantizer_config(q: QuantizerConfig, where: str = "quantizer.params") -> Any:
    """The quantizer's own typed config, built from `params` with every key checked (`where`: their key path)."""
    _, cfg_cls = quantizer_classes(q.kind)
    return from_dict(cfg_cls, q.params, where=where)


def tokenizer_config_to_dict(cfg: TokenizerConfig) -> dict:
    """Plain dict with the quantizer parameters fully resolved (defaults written out)."""
    data = to_dict(cfg)
    data["quantizer"]["params"] = to_dict(quantizer_config(cfg.quantizer))
    return data

