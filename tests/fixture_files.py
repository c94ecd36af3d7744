"""Reading a conformance fixture: its JSON and the official state dict merged from its shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def load_fixture(json_path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(fixture JSON, official state dict merged from its shards in the listed order) of a `kind` fixture."""
    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    if meta.get("fixture") != kind:
        raise AssertionError(f"{json_path} is a '{meta.get('fixture')}' fixture, not '{kind}'")
    sd: dict[str, torch.Tensor] = {}
    for shard in meta["weights"]["files"]:
        sd.update(torch.load(json_path.parent / shard["file"], map_location="cpu", weights_only=True))
    if list(sd) != list(meta["weights"]["state_dict"]):
        raise AssertionError("fixture shards do not merge into the listed state-dict keys in order")
    return meta, sd
