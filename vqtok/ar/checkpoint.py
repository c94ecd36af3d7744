"""Generator checkpoint directories: model.safetensors + config.yaml (the family's config) + generator.json.

generator.json records what the generator is (its family, preset, vocabulary, tokens, classes, scan order:
`family` picks the model class on loading, see vqtok.ar.families) and the
identity of the tokenizer whose tokens it was trained on, so `sample` can refuse a mismatched tokenizer,
and `hash`, the sha256 of the weights (`vqtok.weights.state_dict_sha256`), which loading checks: a damaged
or edited model.safetensors is refused instead of sampling from silently different weights. Checkpoints
written before the hash existed load without the check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vqtok.ar.families import Family, FAMILIES, get_family
from vqtok.config import dump_yaml, from_dict
from vqtok.errors import UserError
from vqtok.weights import read_model_dir, save_model_dir, state_dict_sha256

IDENTITY_FILE = "generator.json"
FORMAT = "vqtok-generator"
VERSION = 1


def family_for_config(cfg) -> Family:
    for family in FAMILIES.values():
        if isinstance(cfg, family.config_cls):
            return family
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered generator family")


def generator_identity(cfg, tokenizer_identity: dict | None, num_parameters: int, extra: dict | None = None) -> dict[str, Any]:
    """What generator.json records. The config supplies `identity_fields()`: vocab_size, seq_len (tokens per
    image), num_classes and anything else family-specific (RAR: preset, scan order)."""
    identity: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "family": family_for_config(cfg).name,
        **cfg.identity_fields(),
        "num_parameters": num_parameters,
        "tokenizer": tokenizer_identity,
    }
    identity.update(extra or {})
    return identity


def save_generator(
    out_dir: str | Path,
    model: nn.Module | dict[str, torch.Tensor],
    config,
    tokenizer_identity: dict | None,
    extra: dict | None = None,
) -> Path:
    """Write a generator checkpoint atomically. `model` is a generator (or a DDP wrapper holding one) or its
    state dict; `config` its family's config."""
    if isinstance(model, nn.Module):
        model = getattr(model, "module", model)  # unwrap DDP
        state = model.state_dict()
    else:
        state = model
    num_parameters = sum(v.numel() for v in state.values())
    identity = generator_identity(config, tokenizer_identity, num_parameters, extra)
    identity["hash"] = state_dict_sha256(state)
    return save_model_dir(out_dir, state, dump_yaml(config), IDENTITY_FILE, identity)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load (model in eval mode, generator.json identity) from a checkpoint directory; the model class is the
    one of the family generator.json names (checkpoints without one are RAR, the only family they had)."""
    state, config_text, identity = read_model_dir(path, IDENTITY_FILE)
    if identity.get("format") != FORMAT:
        raise UserError(f"{Path(path) / IDENTITY_FILE} is not a vqtok generator identity (format {identity.get('format')!r})")
    try:
        data = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        raise UserError(f"{Path(path) / 'config.yaml'} is not valid YAML") from None
    recorded = identity.get("hash")
    if recorded is not None and recorded != state_dict_sha256(state):
        raise UserError(
            f"generator checkpoint {path}: model.safetensors does not match the hash in {IDENTITY_FILE} "
            "(the file was damaged or changed after saving); restore it or export the checkpoint again"
        )
    family = get_family(identity.get("family", "rar"))
    cfg = from_dict(family.config_cls, data, "generator")
    model = family.model_cls(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"generator checkpoint {path} does not match its config.yaml ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"generator checkpoint {path} does not match its config.yaml ({what}); it is damaged or was edited")
    return model.to(device).eval(), identity
