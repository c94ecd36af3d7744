"""The generator families: registry name -> (config class, model class) and what training needs to know.

`train-ar --arch NAME` (and the `arch:` key of an AR recipe) picks a family here; its `config_cls` types
the recipe's `model:` section (unknown keys and wrong types are errors naming the key) and `model_cls`
is built from it. A new family registers one `Family` with:

- `config_cls`, `model_cls`: the model's config dataclass and nn.Module (`model_cls(config)`); the
  model maps class ids with `condition_ids(classes)` and its config has `num_classes`, `class_dropout`
  and `null_class_id`, as the training loop and the sampling loop use them;
- `presets`: named sizes (`model.preset: NAME` starts the section from one of them);
- `token_fields(vocab_size, scales, tokens_per_view)`: the config values the token shards decide
  (vocabulary, sequence length, grid), raising UserError for shards the family cannot train on;
- `accepts_multiscale`: whether multi-scale (next-scale) token shards are accepted; raster families
  refuse them with one line;
- `trains_on_orders`: whether training draws per-sample generation orders (RAR's permutation annealing);
  the others train in their fixed order and the `anneal` section does not apply;
- `train_loss(model, tokens, cond, orders)`: (loss, accuracy) of one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vqtok.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, Callable[[], Any]] = field(default_factory=dict)
    token_fields: Callable[[int, list[list[int]], int], dict[str, Any]] | None = None
    accepts_multiscale: bool = False
    trains_on_orders: bool = False
    train_loss: Callable[..., tuple[Any, Any]] | None = None


def _rar_token_fields(vocab_size: int, scales: list[list[int]], tokens_per_view: int) -> dict[str, Any]:
    return {"vocab_size": int(vocab_size), "seq_len": int(tokens_per_view), "grid": [int(v) for v in scales[0]]}


def _rar_train_loss(model, tokens, cond, orders):
    from vqtok.ar.rar import ar_loss

    return ar_loss(*model.forward_conditions(tokens, cond, orders))


def _rar() -> Family:
    from vqtok.ar.presets import PRESETS
    from vqtok.ar.rar import RAR, RARConfig

    return Family("rar", RARConfig, RAR, presets=dict(PRESETS), token_fields=_rar_token_fields,
                  accepts_multiscale=False, trains_on_orders=True, train_loss=_rar_train_loss)


FAMILIES: dict[str, Family] = {"rar": _rar()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown generator architecture '{name}'; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "get_family"]
