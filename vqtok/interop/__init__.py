"""Loading official checkpoints by key mapping: one module per format.

Each format module exposes `NAME`, `DESCRIPTION`, `matches(state_dict) -> bool` (from key names and
shapes) and `convert(state_dict) -> (config, vqtok_state_dict)`. Tokenizer formats also expose
`to_config` (the config from key shapes alone). A generator format (RAR) may instead provide
`save_converted(state_dict, out_dir)`, which writes its own checkpoint directory.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Mapping

from vqtok.errors import UserError

FORMATS = [
    "vqtok.interop.maskgit",
    "vqtok.interop.var",
    "vqtok.interop.llamagen",
    "vqtok.interop.rar",
    "vqtok.interop.var_gpt",
    "vqtok.interop.llamagen_gpt",
]


def available_formats() -> list[ModuleType]:
    """Every format module, in FORMATS order."""
    return [importlib.import_module(name) for name in FORMATS]


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def format_names() -> list[str]:
    return [m.NAME for m in available_formats()]


def by_name(name: str) -> ModuleType:
    for module in available_formats():
        if _norm(module.NAME) == _norm(name):
            return module
    raise UserError(f"unknown architecture '{name}'; known: {', '.join(format_names())}")


def detect(state_dict: Mapping) -> ModuleType:
    """The format module whose `matches` accepts these keys, or a UserError listing the known ones."""
    found = [m for m in available_formats() if m.matches(state_dict)]
    if not found:
        raise UserError(f"keys match no known architecture (known: {', '.join(format_names())})")
    if len(found) > 1:
        names = ", ".join(m.NAME for m in found)
        raise UserError(f"keys match several architectures ({names}); pick one with --arch")
    return found[0]
