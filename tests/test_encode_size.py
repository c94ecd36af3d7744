"""`encode --size`: the tokenizer's resolution by default; a size that changes the token grid needs a flag."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vqtok.tokenizer.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("size")
    torch.manual_seed(0)
    tok = build_tokenizer("tiny-vqgan")  # trained at 64 px, f8: an 8x8 grid
    tok.save(root / "tok")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "data" / "train" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / "data" / "train" / f"c{c}" / f"{i}.png")
    return root, tok


def _encode(root: Path, out: Path, *extra):
    return runner.invoke(app, ["encode", str(root / "data"), "--tokenizer", str(root / "tok"), "--out", str(out),
                               "--workers", "0", "--device", "cpu", *map(str, extra)])


def test_default_size_is_the_tokenizers_resolution(tmp_path, setup):
    root, tok = setup
    result = _encode(root, tmp_path / "t")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["tokenizer"]["scales"] == [[8, 8]] and manifest["tokenizer"]["tokens_per_view"] == 64
    assert manifest["geometry"]["crop"] == tok.resolution == 64


def test_a_size_that_changes_the_grid_needs_the_flag_and_says_what_grid(tmp_path, setup):
    root, _ = setup
    refused = _encode(root, tmp_path / "r", "--size", 128)
    assert refused.exit_code == 2
    assert "16x16 token grid" in refused.output and "8x8 grid" in refused.output and "--allow-grid-change" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    allowed = _encode(root, tmp_path / "a", "--size", 128, "--allow-grid-change")
    assert allowed.exit_code == 0, allowed.output
    assert "16x16 token grid (256 tokens per view)" in allowed.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["tokenizer"]["scales"] == [[16, 16]]
    # the native size given explicitly needs no flag
    assert _encode(root, tmp_path / "n", "--size", 64).exit_code == 0
