"""VAR and LlamaGen through the user pipeline at micro scale, through the CLI, on the demo photos.

demo-data -> train-tokenizer (tiny-msvq for VAR, tiny-vqgan for LlamaGen) -> encode --ten-crop -> train-ar
--arch var|llamagen (a preview grid and the final export included) -> sample. What a user would type, with a
handful of photos and a few optimiser steps; tests/test_pipeline.py does the same for RAR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vqtok.cli import app

runner = CliRunner()
CLASSES = ["astronaut", "coffee"]


def vqtok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"vqtok {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    vqtok("demo-data", root / "demo-data")
    for name in CLASSES:
        (root / "photos" / "train" / name).mkdir(parents=True)
        for src in sorted((root / "demo-data" / "train" / name).iterdir())[:2]:
            shutil.copy(src, root / "photos" / "train" / name / src.name)
    return root


@pytest.mark.parametrize("arch,tokenizer,recipe", [("var", "tiny-msvq", "var-tiny"),
                                                    ("llamagen", "tiny-vqgan", "llamagen-tiny")])
def test_family_trains_on_demo_tokens_and_samples(photos, arch, tokenizer, recipe):
    root = photos / arch
    tok, tokens, run, samples = root / "tok", root / "tokens", root / "gen", root / "samples"
    vqtok("train-tokenizer", photos / "photos", "--config", tokenizer, "--out", tok, "--device", "cpu",
          "train.steps=2", "train.batch_size=4", "train.num_workers=0", "train.ckpt_every=2", "train.preview_every=2")
    vqtok("encode", photos / "photos", "--ten-crop", "--size", 64, "--tokenizer", tok / "final", "--out", tokens,
          "--shard-size", 3, "--batch-size", 2, "--workers", 0, "--device", "cpu")
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert (len(manifest["tokenizer"]["scales"]) > 1) == (arch == "var")
    log = vqtok("train-ar", tokens, "--tokenizer", tok / "final", "--arch", arch, "--config", recipe, "--epochs", 4,
                "--out", run, "--device", "cpu", "train.batch_size=4", "train.ckpt_every=4", "train.preview_every=4",
                "train.log_every=1")
    assert "generator saved to" in log
    generator = json.loads((run / "final" / "generator.json").read_text())
    assert generator["family"] == arch
    assert list((run / "previews").glob("step-*.png")), "the engine's preview grid was not written"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    out = vqtok("sample", "--ckpt", run / "final", "--per-class", 2, "--cfg", 2.0, "--png", "--out", samples,
                "--device", "cpu")
    assert "wrote 4 samples" in out
    assert (samples / "grid.png").is_file() and len(list((samples / "images").glob("*.png"))) == 4
    assert sorted(np.load(samples / "labels.npy").tolist()) == [0, 0, 1, 1]
