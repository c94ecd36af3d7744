"""The generator families vqtok trains, loads and samples, by name (`train-ar --arch NAME`, checkpoints).

Every family is a model class with its typed config class. The model implements the one sampling loop's
interface (vqtok.ar.sampling.sample: `generation_steps`, `generation_order`, `condition_ids`,
`null_condition_ids`, `default_decoder`). `multiscale_tokens` says which token shards it trains on: next-scale
families (VAR) need multi-scale tokens, raster families refuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vqtok.ar.llamagen import LlamaGen, LlamaGenConfig
from vqtok.ar.rar import RAR, RARConfig
from vqtok.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    multiscale_tokens: bool = False  # True: needs multi-scale token shards; False: refuses them
    summary: str = ""


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown generator architecture '{name}'; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if isinstance(model, family.model_cls):
            return family
    raise ValueError(f"{type(model).__name__} is not a registered generator family")


register(Family("rar", RARConfig, RAR, multiscale_tokens=False,
                summary="randomized autoregressive (RAR): one token per step, permutation annealing"))
register(Family("llamagen", LlamaGenConfig, LlamaGen, multiscale_tokens=False,
                summary="LlamaGen c2i GPT: raster order, one token per step, 2D RoPE"))
