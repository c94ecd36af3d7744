"""Named presets of every model family, gathered for `vqtok info` and lookups by name.

Each family has a `presets` module exposing `PRESETS: dict[str, Callable[[], <config dataclass>]]`.
"""

from __future__ import annotations

import importlib

FAMILIES = {
    "tokenizer": "vqtok.tokenizer.presets",
    "generator": "vqtok.ar.presets",
}


def list_presets() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind, module_name in FAMILIES.items():
        out[kind] = sorted(importlib.import_module(module_name).PRESETS)
    return out
