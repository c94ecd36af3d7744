"""Shared checks for loading official tokenizer checkpoints (nanoGPT `from_pretrained` style).

vqtok's tokenizer modules are named like the official ones, so each format's key mapping is close to
the identity; what matters is that it is explicit and checked: every official key is used exactly once,
no vqtok key is left without a source, and every shape matches. The checks work on shapes alone, so the
full-size key listings can be verified on the meta device without allocating a model.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from vqtok.errors import UserError
from vqtok.tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig

Shape = tuple[int, ...]


def shape_of(value) -> Shape:
    """A tensor's shape, or a shape given as a list (key listings)."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(int(v) for v in value)


def shapes(state: Mapping) -> dict[str, Shape]:
    return {k: shape_of(v) for k, v in state.items()}


def expected_shapes(cfg: TokenizerConfig) -> dict[str, Shape]:
    """{key: shape} of the vqtok Tokenizer built from `cfg`, constructed on the meta device (no memory)."""
    from vqtok.tokenizer.tokenizer import Tokenizer

    with torch.device("meta"):
        model = Tokenizer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_exact_keys(state: Mapping, wanted: Mapping[str, Shape], fmt: str, hint: str) -> None:
    """Every wanted key present with its shape and every entry of `state` used; one UserError otherwise
    (`fmt` names the format, `hint` asks what the file really is)."""
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UserError(f"{fmt} weights are missing {len(missing)} tensor(s), e.g. {missing[0]}; the file is incomplete")
    unused = [k for k in state if k not in wanted]
    if unused:
        raise UserError(f"{fmt} weights hold {len(unused)} unexpected tensor(s), e.g. {unused[0]}; {hint}")
    for key, want in wanted.items():
        got = shape_of(state[key])
        if got != tuple(want):
            raise UserError(f"{fmt} tensor {key} has shape {list(got)}, expected {list(want)} for the detected size")


def indices_under(state: Mapping, prefix: str) -> list[int]:
    """Sorted distinct integers i of keys that start with `prefix` + "{i}." (e.g. levels, blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return sorted(found)


def require(state: Mapping, key: str, fmt: str) -> Shape:
    if key not in state:
        raise UserError(f"this {fmt} checkpoint lacks {key}; is it a complete {fmt} state dict?")
    return shape_of(state[key])


def key_mapping(
    official: Mapping, cfg: TokenizerConfig, rename: Callable[[str], str], fmt: str,
    want: dict[str, Shape] | None = None,
) -> dict[str, str]:
    """{official key: vqtok key}, asserting every key used once, none missing and all shapes equal."""
    src = shapes(official)
    want = expected_shapes(cfg) if want is None else want
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for key, shape in src.items():
        target = rename(key)
        if target not in want:
            raise UserError(f"{fmt} key {key} has no place in the detected architecture (would be {target})")
        if target in used:
            raise UserError(f"{fmt} keys map twice onto {target}")
        if want[target] != shape:
            raise UserError(f"{fmt} key {key} has shape {list(shape)} but the architecture needs {list(want[target])}")
        mapping[key] = target
        used.add(target)
    missing = [k for k in want if k not in used]
    if missing:
        raise UserError(f"this {fmt} checkpoint lacks {len(missing)} weight(s) the architecture needs, e.g. {missing[0]}")
    return mapping


def convert_state(
    state: Mapping[str, torch.Tensor], cfg: TokenizerConfig, rename: Callable[[str], str], fmt: str
) -> dict[str, torch.Tensor]:
    """The official tensors under vqtok names, float32, in vqtok's state-dict order (checked first)."""
    want = expected_shapes(cfg)
    mapping = key_mapping(state, cfg, rename, fmt, want)
    renamed = {mapping[k]: v.detach().to(torch.float32) for k, v in state.items()}
    return {k: renamed[k] for k in want}


def official_config(ae: AutoencoderConfig, quantizer: QuantizerConfig, resolution: int,
                    value_range: tuple[float, float]) -> TokenizerConfig:
    """The TokenizerConfig of an official checkpoint, named after the preset it equals (if any)."""
    cfg = TokenizerConfig(preset="", resolution=resolution, value_range=value_range, autoencoder=ae, quantizer=quantizer)
    cfg.preset = matching_preset(cfg)
    return cfg


def convert_with(to_config: Callable[..., TokenizerConfig], rename: Callable[[str], str], fmt: str,
                 state: Mapping[str, torch.Tensor], *args) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    """A format's `convert`: its config from the shapes (`to_config(state, *args)`), then the checked tensors."""
    cfg = to_config(state, *args)
    return cfg, convert_state(state, cfg, rename, fmt)


def matching_preset(cfg: TokenizerConfig) -> str:
    """Name of the preset whose architecture equals `cfg` (ignoring the preset field), else ""."""
    from vqtok.tokenizer.config import tokenizer_config_to_dict
    from vqtok.tokenizer.presets import PRESETS

    def body(c: TokenizerConfig) -> dict:
        d = tokenizer_config_to_dict(c)
        d.pop("preset")
        return d

    mine = body(cfg)
    for name, make in PRESETS.items():
        try:
            if body(make()) == mine:
                return name
        except UserError:  # a preset whose quantizer kind is not available cannot match
            continue
    return ""
