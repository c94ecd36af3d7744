"""The generator families vqtok trains, loads and samples, by name (`train-ar --arch NAME`, checkpoints).

Every family is a model class with its typed config class. The model implements the one sampling loop's
interface (vqtok.ar.sampling.sample: `generation_steps`, `generation_order`, `condition_ids`,
`null_condition_ids`, `default_decoder`). `multiscale_tokens` says which token shards it trains on: next-scale
families (VAR) need multi-scale tokens, raster families refuse them.

What `train-ar` needs besides (vqtok/train/ar_task.py; the config class types the recipe's `model:`):
`presets` (named sizes: `model.preset: NAME` starts the section from one), `token_fields(vocab_size, scales,
tokens_per_view)` (the config values the token shards decide), `trains_on_orders` (training draws
per-sample generation orders, RAR's permutation annealing; the others train in their fixed order) and
`train_loss(model, tokens, cond, orders)` -> (loss, accuracy) of one micro-batch; optionally
`bind_tokenizer(model, tokenizer)`, called once the model is built, for families whose model reads the
tokenizer (VAR builds its next-scale inputs from the multi-scale codebook).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from vqtok.ar import llamagen, presets, var
from vqtok.ar.llamagen import LlamaGen, LlamaGenConfig
from vqtok.ar.rar import RAR, RARConfig, ar_loss
from vqtok.ar.var import VAR, VARConfig
from vqtok.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    multiscale_tokens: bool = False  # True: needs multi-scale token shards; False: refuses them
    summary: str = ""
    presets: dict[str, Callable[[], Any]] = field(default_factory=dict)
    token_fields: Callable[[int, list[list[int]], int], dict[str, Any]] | None = None
    trains_on_orders: bool = False
    train_loss: Callable[..., tuple[Any, Any]] | None = None
    bind_tokenizer: Callable[[nn.Module, Any], None] | None = None


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


def _rar_token_fields(vocab_size: int, scales: list[list[int]], tokens_per_view: int) -> dict[str, Any]:
    return {"vocab_size": int(vocab_size), "seq_len": int(tokens_per_view), "grid": [int(v) for v in scales[0]]}


def _rar_train_loss(model: RAR, tokens, cond, orders):
    return ar_loss(*model.forward_conditions(tokens, cond, orders))


register(Family("rar", RARConfig, RAR, multiscale_tokens=False,
                summary="randomized autoregressive (RAR): one token per step, permutation annealing",
                presets=dict(presets.PRESETS), token_fields=_rar_token_fields, trains_on_orders=True, train_loss=_rar_train_loss))


def _var_bind_tokenizer(model: VAR, tokenizer) -> None:
    model.bind_quantizer(getattr(tokenizer, "quantize", tokenizer))


register(Family("var", VARConfig, VAR, multiscale_tokens=True,
                summary="next-scale prediction (VAR): one whole scale per step over the multi-scale tokenizer",
                presets=dict(var.PRESETS), token_fields=var.token_fields, trains_on_orders=False,
                train_loss=var.train_loss, bind_tokenizer=_var_bind_tokenizer))
register(Family("llamagen", LlamaGenConfig, LlamaGen, multiscale_tokens=False,
                summary="LlamaGen c2i GPT: raster order, one token per step, 2D RoPE",
                presets=dict(llamagen.PRESETS), token_fields=llamagen.token_fields, trains_on_orders=False,
                train_loss=llamagen.train_loss))
