"""`vqtok convert` on files laid out exactly as the official releases are, built from the fixtures' key
listings (fixtures/keys/*.json: every key and shape of the official class at its released size), not from
vqtok's own modules.

Each official tensor gets its own random contents, the file is written the way the official code saves it
(LlamaGen's under checkpoint["model"]), and the converted checkpoint, loaded back, must hold every
official tensor bit for bit exactly once, under the name the converter maps it to, with the listing's
parameter count.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vqtok.cli import app

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("VQTOK_FIXTURES", REPO.parent / "shared" / "fixtures"))
REQUIRED = os.environ.get("VQTOK_REQUIRE_FIXTURES") == "1"
# the tokenizer releases (RAR's mapping is the identity; tests/test_fixtures.py converts its fixture weights and
# checks every full-size RAR listing on the meta device)
LISTINGS = ["maskgit_vqgan_imagenet_f16_256", "var_vae_ch160v4096z32", "llamagen_vq_16"]


def _listing(name: str) -> dict:
    path = FIXTURES / "keys" / f"{name}.json"
    if not path.is_file():
        if REQUIRED:
            pytest.fail(f"{path} not found, and VQTOK_REQUIRE_FIXTURES=1 makes that a failure")
        pytest.skip(f"{path} not found (set VQTOK_FIXTURES)")
    return json.loads(path.read_text())


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def official_state(listing: dict) -> dict[str, torch.Tensor]:
    """The listed keys and shapes in their listed order, each tensor with its own random contents."""
    assert listing["dtypes"] == ["float32"], "these releases hold float32 tensors only"
    g = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=g) for key, shape in listing["state_dict"].items()}


@pytest.mark.parametrize("name", LISTINGS)
def test_convert_a_file_with_the_official_keys_keeps_every_tensor(name, tmp_path):
    listing = _listing(name)
    state = official_state(listing)
    assert len(state) == listing["num_state_dict_entries"]
    path = tmp_path / listing["released_weight_file"].split()[0]
    torch.save({"model": state} if name.startswith("llamagen") else state, path)

    result = CliRunner().invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    from vqtok.interop import detect
    from vqtok.tokenizer.tokenizer import load_tokenizer

    model = load_tokenizer(tmp_path / "ckpt")
    rename = detect(state).rename
    mapped = {k: rename(k) for k in state}
    loaded = model.state_dict()
    # bit for bit, under the mapped name, and no official tensor lost or used twice
    assert len({_digest(t) for t in state.values()}) == len(state), "random contents collided"
    for key, tensor in state.items():
        ours = loaded[mapped[key]]
        assert ours.shape == tensor.shape, key
        assert torch.equal(ours.to(tensor.dtype), tensor), f"{key} -> {mapped[key]} does not hold the official values"
    assert len(set(mapped.values())) == len(mapped) and set(loaded) == set(mapped.values())
    official_params = sum(state[k].numel() for k in state if k not in listing.get("persistent_buffers", []))
    assert official_params == listing["num_parameters"]
    assert sum(p.numel() for p in model.parameters()) == listing["num_parameters"]
