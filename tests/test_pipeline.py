"""The whole user pipeline at micro scale, through the CLI, so a broken hand-off between stages fails here.

demo-data -> train-tokenizer -> reconstruct -> encode --ten-crop -> inspect -> train-ar --anneal -> sample (CFG).
Each stage gets the previous stage's output exactly as a user would pass it, and each stage's file contract
(checkpoint directories, token shards, sample outputs) is asserted before the next stage runs. `make demo` (examples/demo.py) runs the same
chain with bigger settings; this test uses a handful of photos and a few optimiser steps.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app

runner = CliRunner()
CLASSES = ["astronaut", "coffee"]  # two of the demo dataset's classes, two photos each


def vqtok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"vqtok {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """Run the chain once; the tests below check what each stage left behind."""
    root = tmp_path_factory.mktemp("pipeline")
    paths = {"data": root / "demo-data", "photos": root / "photos", "tok": root / "runs" / "tok",
             "recon": root / "recon", "tokens": root / "tokens", "rar": root / "runs" / "rar", "samples": root / "samples"}

    vqtok("demo-data", paths["data"])
    # A handful of the real photos keeps every later stage to seconds.
    for name in CLASSES:
        (paths["photos"] / "train" / name).mkdir(parents=True)
        for src in sorted((paths["data"] / "train" / name).iterdir())[:2]:
            shutil.copy(src, paths["photos"] / "train" / name / src.name)

    paths["tok_log"] = vqtok(
        "train-tokenizer", paths["photos"], "--config", "tiny-vqgan", "--out", paths["tok"], "--device", "cpu",
        # 3 steps with the discriminator on from step 1, so both the G and the D updates run.
        "train.steps=3", "train.batch_size=4", "train.num_workers=0", "loss.disc_start=1",
        "train.ckpt_every=3", "train.preview_every=3", "train.log_every=1",
    )
    tok_final = paths["tok"] / "final"
    paths["recon_log"] = vqtok("reconstruct", paths["photos"] / "train" / "coffee", "--tokenizer", tok_final,
                               "--out", paths["recon"], "--device", "cpu")
    vqtok("encode", paths["photos"], "--ten-crop", "--size", 64, "--tokenizer", tok_final, "--out", paths["tokens"],
          "--shard-size", 3, "--batch-size", 2, "--workers", 0, "--device", "cpu")
    paths["inspect_log"] = vqtok("inspect", paths["tokens"])
    # 4 images at batch 4 = one step per epoch: 4 epochs = 4 steps, annealed from epoch 1 to 3.
    paths["rar_log"] = vqtok(
        "train-ar", paths["tokens"], "--tokenizer", tok_final, "--config", "rar-tiny", "--anneal", 1, 3,
        "--epochs", 4, "--out", paths["rar"], "--device", "cpu",
        "train.batch_size=4", "train.ckpt_every=4", "train.preview_every=4", "train.log_every=1",
    )
    paths["sample_log"] = vqtok(
        "sample", "--ckpt", paths["rar"] / "final", "--tokenizer", tok_final, "--cfg", 3.0, "--per-class", 2,
        "--npz", "--png", "--out", paths["samples"], "--device", "cpu",
    )
    return paths


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_demo_data_is_an_imagenet_layout_of_real_photos(pipeline):
    train = pipeline["data"] / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    assert len(classes) == 8 and set(CLASSES) <= set(classes)
    for name in classes:
        photos = list((train / name).iterdir())
        assert len(photos) == 4
        with Image.open(photos[0]) as im:
            assert min(im.size) >= 256  # big enough for the 256 px ADM crops encode makes by default


def test_tokenizer_run_leaves_a_loadable_checkpoint_dir(pipeline):
    from vqtok.tokenizer.tokenizer import load_tokenizer

    run = pipeline["tok"]
    final = run / "final"
    assert {"model.safetensors", "config.yaml", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert (run / "config.yaml").is_file() and "tokenizer saved to" in pipeline["tok_log"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and max(r.get("step", 0) for r in rows) == 3
    assert any("d_loss" in r for r in rows), "the discriminator never ran (loss.disc_start=1)"
    identity = json.loads((final / "tokenizer.json").read_text())
    assert identity["preset"] == "tiny-vqgan" and identity["tokens_per_image"] == 64 and identity["resolution"] == 64
    tok = load_tokenizer(final)
    assert tok.vocab_size == identity["vocab_size"] and tok.identity()["hash"] == identity["hash"]


def test_reconstruct_writes_side_by_side_pngs_grid_and_metrics(pipeline):
    out = pipeline["recon"]
    pairs = sorted(p for p in out.glob("coffee_*.png"))
    assert len(pairs) == 2
    assert _png_size(pairs[0]) == (128, 64)  # original | reconstruction at the tokenizer's 64 px
    _png_size(out / "grid.png")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "PSNR" in pipeline["recon_log"] and "SSIM" in pipeline["recon_log"]
    assert [m["name"] for m in metrics["images"]] == ["coffee_0000", "coffee_0001"]
    assert 0 < metrics["mean_psnr"] < 100 and -1 <= metrics["mean_ssim"] <= 1


def test_ten_crop_token_shards_follow_the_manifest(pipeline):
    from vqtok.data.token_shards import iter_samples, read_manifest

    tokens_dir = pipeline["tokens"]
    manifest = read_manifest(tokens_dir)
    identity = json.loads((pipeline["tok"] / "final" / "tokenizer.json").read_text())
    assert manifest["format"] == "wds" and manifest["version"] >= 1
    assert manifest["tokenizer"]["hash"] == identity["hash"] and manifest["tokenizer"]["tokens_per_view"] == 64
    assert len(manifest["views"]) == 10 and manifest["views"][4] == "center"
    assert manifest["classes"] == CLASSES and manifest["num_samples"] == 4 and manifest["num_skipped"] == 0
    assert [s["count"] for s in manifest["shards"]] == [3, 1]
    assert all((tokens_dir / s["name"]).is_file() for s in manifest["shards"])
    assert (tokens_dir / "skipped.jsonl").read_text().strip() == ""
    samples = list(iter_samples(tokens_dir))
    assert len(samples) == 4
    for key, tokens, cls in samples:
        assert "." not in key and cls == CLASSES.index(key.split("_")[0])
        assert tokens.dtype == np.uint16 and tokens.shape == (10, 64)
        assert int(tokens.max()) < identity["vocab_size"]
    assert re.search(r"samples\s+4 ", pipeline["inspect_log"]) and "OK" in pipeline["inspect_log"]


def test_generator_checkpoint_records_the_tokenizer_and_the_annealing(pipeline):
    run = pipeline["rar"]
    final = run / "final"
    assert {"model.safetensors", "config.yaml", "generator.json"} <= {p.name for p in final.iterdir()}
    assert "generator saved to" in pipeline["rar_log"]
    gen = json.loads((final / "generator.json").read_text())
    identity = json.loads((pipeline["tok"] / "final" / "tokenizer.json").read_text())
    assert gen["tokenizer"]["hash"] == identity["hash"]
    assert gen["vocab_size"] == identity["vocab_size"] and gen["seq_len"] == 64 and gen["num_classes"] == 2
    assert gen["steps"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ratios = [r["r"] for r in rows if "r" in r]
    # r=1 before epoch 1, 0 from epoch 3: the logged schedule must fall from 1 to 0.
    assert ratios and ratios[0] == 1.0 and ratios[-1] == 0.0


def test_guided_samples_are_written_as_grid_pngs_and_adm_npz(pipeline):
    out = pipeline["samples"]
    labels = np.load(out / "labels.npy")
    assert sorted(labels.tolist()) == [0, 0, 1, 1]  # --per-class 2 over the 2 classes
    with np.load(out / "samples.npz") as npz:
        images = npz["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (4, 64, 64, 3)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(4)]
    assert np.array_equal(np.asarray(Image.open(pngs[0]).convert("RGB")), images[0])
    _png_size(out / "grid.png")
    meta = json.loads((out / "sample.json").read_text())
    assert meta["sampling"]["guidance_scale"] == 3.0 and meta["num_samples"] == 4


def test_sampling_refuses_a_tokenizer_the_generator_was_not_trained_on(pipeline, tmp_path):
    from vqtok.tokenizer.tokenizer import build_tokenizer

    other = build_tokenizer("tiny-fsq").save(tmp_path / "other-tok")
    result = runner.invoke(app, ["sample", "--ckpt", str(pipeline["rar"] / "final"), "--tokenizer", str(other),
                                 "--num-samples", "1", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "tokenizer" in result.output.lower()


def test_sampling_finds_the_tokenizer_train_ar_recorded(pipeline, tmp_path):
    gen = json.loads((pipeline["rar"] / "final" / "generator.json").read_text())
    assert Path(gen["tokenizer_path"]).resolve() == (pipeline["tok"] / "final").resolve()
    assert gen["classes"] == json.loads((pipeline["tokens"] / "manifest.json").read_text())["classes"]
    # --classes takes the manifest's class names as well as ids
    vqtok("sample", "--ckpt", pipeline["rar"] / "final", "--classes", f"{gen['classes'][1]},0", "--npz",
          "--out", tmp_path / "s", "--device", "cpu")
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 64, 64, 3) and npz["labels"].tolist() == [1, 0]
