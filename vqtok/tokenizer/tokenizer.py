"""The Tokenizer facade: encoder + quantizer + decoder behind encode / decode / forward.

    tok = build_tokenizer("tiny-vqgan")
    idx = tok.encode(images)            # images (B, 3, H, W) float in [0, 1] -> (B, tokens) int64
    rec = tok.decode(idx)               # -> (B, 3, H, W) in [0, 1], clamped
    out = tok(images)                   # training: TokenizerOutput(recon, indices, aux), recon unclamped
    tok.save("runs/tok/final"); tok = load_tokenizer("runs/tok/final")

Images always enter and leave in [0, 1]; the conversion to the model's own range (MaskGIT [0, 1],
VAR / LlamaGen [-1, 1]) happens here. Module names (`encoder`, `decoder`, `quantize`, `quant_conv`,
`post_quant_conv`) are those of the official checkpoints, so their state dicts load key for key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn

from vqtok.config import ConfigError, dump_yaml, from_dict, to_dict
from vqtok.errors import UserError
from vqtok.weights import state_dict_sha256, tensor_bytes_sha256
from vqtok.tokenizer.autoencoder import Decoder, Encoder
from vqtok.tokenizer.config import TokenizerConfig, quantizer_classes, quantizer_config, tokenizer_config_to_dict

IDENTITY_FILE = "tokenizer.json"


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor      # (B, 3, H, W), [0, 1] scale, not clamped
    indices: torch.Tensor    # (B, tokens) int64
    aux: dict[str, torch.Tensor]


class Tokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        ae = config.autoencoder
        self.encoder = Encoder(ae)
        self.decoder = Decoder(ae)
        quantizer_cls, _ = quantizer_classes(config.quantizer.kind)
        self.quantize = quantizer_cls(quantizer_config(config.quantizer))
        qdim = self.quantize.dim
        if ae.quant_conv_kernel:
            k = ae.quant_conv_kernel
            self.quant_conv = nn.Conv2d(ae.z_channels, qdim, k, padding=k // 2)
            self.post_quant_conv = nn.Conv2d(qdim, ae.z_channels, k, padding=k // 2)
        else:
            if qdim != ae.z_channels:
                raise ConfigError(
                    f"without quant convs the quantizer dim ({qdim}) must equal autoencoder.z_channels ({ae.z_channels})"
                )
            self.quant_conv = None
            self.post_quant_conv = None
        self.multiscale = config.quantizer.kind == "msvq"
        self.downsample = config.downsample
        self.resolution = config.resolution
        self.vocab_size = int(self.quantize.codebook_size)
        self.scales = self._scales_at(config.resolution, config.resolution)
        self.tokens_per_image = sum(h * w for h, w in self.scales)
        self.legacy_hash: str | None = None  # set by load_tokenizer for a checkpoint with the earlier hash form

    # ------------------------------------------------------------------ geometry

    def _scales_at(self, height: int, width: int) -> list[tuple[int, int]]:
        h, w = height // self.downsample, width // self.downsample
        if self.multiscale:
            return [tuple(int(v) for v in s) for s in self.quantize.scales]
        return [(h, w)]

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != self.config.autoencoder.in_channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise UserError(f"images must be a (B, {self.config.autoencoder.in_channels}, H, W) tensor; got {shape}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample or h == 0 or w == 0:
            raise UserError(f"image size {h}x{w} is not a multiple of the tokenizer's downsample factor {self.downsample}")
        if self.multiscale and (h, w) != (self.resolution, self.resolution):
            raise UserError(
                f"this multi-scale tokenizer takes {self.resolution}x{self.resolution} images; got {h}x{w}"
            )
        if not images.is_floating_point():
            raise UserError(f"images must be floating point in [0, 1]; got dtype {images.dtype}")

    def _to_native(self, images: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.value_range
        return images if (lo, hi) == (0.0, 1.0) else images * (hi - lo) + lo

    def _from_native(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.value_range
        return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)

    # ------------------------------------------------------------------ building blocks of the pipeline

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the continuous latent the quantizer sees (after quant_conv)."""
        z = self.encoder(self._to_native(images))
        return self.quant_conv(z) if self.quant_conv is not None else z

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latent -> image in the model's native range, unclamped."""
        if self.post_quant_conv is not None:
            z_q = self.post_quant_conv(z_q)
        return self.decoder(z_q)

    def last_layer_weight(self) -> nn.Parameter:
        """The decoder's final conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ public API

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        self._check_images(images)
        z_q, indices, aux = self.quantize(self.encode_latent(images))
        recon = self._from_native(self.decode_latent(z_q))
        return TokenizerOutput(recon, indices.reshape(indices.shape[0], -1), aux)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, tokens) int64. Never updates codebook statistics."""
        self._check_images(images)
        modules = list(self.modules())
        modes = [m.training for m in modules]
        self.eval()  # deterministic tokens, and no codebook EMA / usage updates from encoding
        try:
            _, indices, _ = self.quantize(self.encode_latent(images))
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
        return indices.reshape(indices.shape[0], -1).long()

    def grid_for(self, num_tokens: int) -> list[tuple[int, int]]:
        """The token grid(s) of a sequence of `num_tokens`, or a UserError naming the valid count."""
        if num_tokens == self.tokens_per_image:
            return self.scales
        side = math.isqrt(num_tokens)
        if not self.multiscale and side * side == num_tokens and side > 0:
            return [(side, side)]
        raise UserError(
            f"got {num_tokens} tokens per image but this tokenizer makes {self.tokens_per_image} "
            f"at {self.resolution}px" + ("" if self.multiscale else " (or any square grid)")
        )

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, tokens) -> quantized latent (B, dim, h, w), checking count and range first."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 2:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise UserError(f"token indices must be a (B, tokens) integer tensor; got {shape}")
        if indices.is_floating_point() or indices.is_complex():
            raise UserError(f"token indices must be integers; got dtype {indices.dtype}")
        grids = self.grid_for(indices.shape[1])
        self.quantize.check_indices(indices)
        indices = indices.long()
        if self.multiscale:
            return self.quantize.indices_to_codes(indices)
        (h, w), = grids
        return self.quantize.indices_to_codes(indices.reshape(-1, h, w))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, tokens) int -> (B, 3, H, W) in [0, 1], clamped. UserError for a bad count or index."""
        device = next(self.parameters()).device
        z_q = self.codes_from_indices(indices.to(device) if isinstance(indices, torch.Tensor) else indices)
        return self._from_native(self.decode_latent(z_q)).clamp(0.0, 1.0)

    @torch.no_grad()
    def decode_progressive(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale tokenizers: the images decoded from the first k scales, k = 1..K ([0, 1], clamped)."""
        if not self.multiscale:
            raise UserError("progressive decoding needs a multi-scale (msvq) tokenizer")
        self.codes_from_indices(indices)  # checks count and range
        device = next(self.parameters()).device
        per_scale = self.quantize.split_scales(indices.to(device).long())
        return [
            self._from_native(self.decode_latent(self.quantize.decode_scales(per_scale, upto=k))).clamp(0.0, 1.0)
            for k in range(1, len(per_scale) + 1)
        ]

    # ------------------------------------------------------------------ identity and checkpoints

    def identity(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """What tokenizer.json records: enough for token shards and generators to check compatibility."""
        return {
            "preset": self.config.preset,
            "vocab_size": self.vocab_size,
            "scales": [list(s) for s in self.scales],
            "tokens_per_image": self.tokens_per_image,
            "resolution": self.resolution,
            "downsample": self.downsample,
            "value_range": [0.0, 1.0],  # what encode() takes and decode() returns
            "model_value_range": list(self.config.value_range),
            "index_dtype": "uint16" if self.vocab_size <= 65536 else "uint32",
            "hash": state_dict_sha256(self._in_model_order(state_dict)),
            # loaded from a checkpoint that recorded the earlier hash form: what token shards and
            # generators made with it recorded, so they still match these (unchanged) weights
            **({"legacy_hash": self.legacy_hash} if self.legacy_hash and state_dict is None else {}),
        }

    def _in_model_order(self, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        own = self.state_dict()
        return own if state is None else {k: state[k] for k in own}

    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the checkpoint directory (model.safetensors, config.yaml, tokenizer.json) atomically.

        `state_dict` lets a trainer save other weights of the same architecture (its EMA copy).
        """
        from vqtok.weights import save_model_dir

        state = self.state_dict() if state_dict is None else state_dict
        missing = set(self.state_dict()) ^ set(state)
        if missing:
            raise ValueError(f"state_dict does not match the tokenizer's keys (e.g. {sorted(missing)[0]})")
        config_yaml = dump_yaml(tokenizer_config_to_dict(self.config))
        return save_model_dir(path, state, config_yaml, IDENTITY_FILE, self.identity(state))


# ------------------------------------------------------------------ construction


def tokenizer_config_from_dict(data: dict[str, Any], where: str = "") -> TokenizerConfig:
    """A TokenizerConfig from a dict that may name a `preset` and override any of its keys (`where`: its key path)."""
    from vqtok.tokenizer.presets import PRESETS

    if not isinstance(data, dict):
        raise ConfigError(f"a tokenizer config must be a mapping, got {type(data).__name__}")
    name = data.get("preset") or ""
    if name and name in PRESETS:
        base = to_dict(PRESETS[name]())
        merged = _merge(base, data)
        over_q = data.get("quantizer") or {}
        if isinstance(over_q, dict) and over_q.get("kind", base["quantizer"]["kind"]) != base["quantizer"]["kind"]:
            merged["quantizer"] = over_q  # another quantizer kind: the preset's parameters do not apply
        cfg = from_dict(TokenizerConfig, merged, where)
    elif name and not ("autoencoder" in data and "quantizer" in data):
        raise ConfigError(f"unknown tokenizer preset '{name}'; known: {', '.join(sorted(PRESETS))}")
    else:
        cfg = from_dict(TokenizerConfig, data, where)
    cfg.validate(where)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_tokenizer(spec: str | TokenizerConfig | dict) -> Tokenizer:
    """A freshly initialised Tokenizer from a preset name, a config or a config dict."""
    if isinstance(spec, TokenizerConfig):
        return Tokenizer(spec)
    if isinstance(spec, str):
        from vqtok.tokenizer.presets import PRESETS

        if spec not in PRESETS:
            raise UserError(f"unknown tokenizer preset '{spec}'; known: {', '.join(sorted(PRESETS))}")
        return Tokenizer(PRESETS[spec]())
    return Tokenizer(tokenizer_config_from_dict(spec))


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer from a checkpoint directory, in eval mode, checking weights against the hash."""
    from vqtok.weights import read_model_dir

    state, config_text, identity = read_model_dir(path, IDENTITY_FILE)
    try:
        data = yaml.safe_load(config_text)
    except yaml.YAMLError:
        raise UserError(f"{Path(path) / 'config.yaml'} is not valid YAML") from None
    try:
        cfg = tokenizer_config_from_dict(data or {})
    except ConfigError as exc:
        raise UserError(f"{Path(path) / 'config.yaml'} does not describe a tokenizer: {exc}") from None
    tok = Tokenizer(cfg)
    expected = tok.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected {unexpected[0]}"
        raise UserError(f"checkpoint {path} does not match its config.yaml: model.safetensors {what}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"checkpoint {path} does not match its config.yaml: {k} has shape {tuple(state[k].shape)}, "
                f"expected {tuple(v.shape)}"
            )
    ordered = {k: state[k] for k in expected}
    recorded = identity.get("hash")
    if recorded and recorded != state_dict_sha256(ordered):
        if recorded != tensor_bytes_sha256(ordered):  # the hash form older checkpoints recorded
            raise UserError(f"checkpoint {path} was modified after saving: its weights no longer match the hash in {IDENTITY_FILE}")
        tok.legacy_hash = recorded
    tok.load_state_dict(ordered, strict=True)
    return tok.to(device).eval()
