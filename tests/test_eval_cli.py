"""`vqtok reconstruct`, `vqtok eval-tokenizer` and `vqtok eval-fid` through typer's CliRunner, on tiny tokenizers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.eval.inception import INCEPTION_WEIGHTS_FILE
from vqtok.eval.tokenizer_eval import TokenizerEvalOptions, evaluate_tokenizer
from vqtok.tokenizer.tokenizer import build_tokenizer, load_tokenizer

from eval_random_inception import random_inception_state_dict, use_small_inception_input

runner = CliRunner()


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth synthetic picture (gradients plus a disc), so reconstructions are not pure noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    img = np.stack([a * xx, b * yy, c * (1 - xx) * (1 - yy)], axis=-1)
    img[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.05] = rng.uniform(0, 1, 3)
    return Image.fromarray((img * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny-vqgan"
    build_tokenizer("tiny-vqgan").save(path)
    return path


@pytest.fixture(scope="module")
def tiny_msvq(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny-msvq"
    build_tokenizer("tiny-msvq").save(path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "cls_a").mkdir(parents=True)
    (folder / "cls_b").mkdir()
    photo((96, 80), 0).save(folder / "cls_a" / "one.png")
    photo((70, 120), 1).convert("L").save(folder / "cls_a" / "two.jpg")  # grayscale, portrait
    photo((64, 64), 2).save(folder / "cls_b" / "three.png")
    photo((200, 150), 3).save(folder / "cls_b" / "four.jpeg")
    return folder


def test_reconstruct_writes_pairs_grid_and_metrics(tmp_path, tiny_vqgan, images):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = runner.invoke(app, ["reconstruct", str(images), str(broken), "--tokenizer", str(tiny_vqgan), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "mean of 4" in result.output
    assert "skipping" in result.output and "broken.png" in result.output
    pairs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert pairs == ["four.png", "one.png", "three.png", "two.png"]
    pair = np.array(Image.open(out / "one.png"))
    assert pair.shape == (64, 128, 3)  # original | reconstruction at the tokenizer's 64 px
    assert (out / "grid.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["images"]) == 4 and metrics["skipped"][0]["source"].endswith("broken.png")

    # The printed PSNR is the one of the written pixels: recompute it from the PNG.
    left, right = pair[:, :64].astype(np.float64) / 255, pair[:, 64:].astype(np.float64) / 255
    expected = 10 * np.log10(1.0 / ((left - right) ** 2).mean())
    one = next(m for m in metrics["images"] if m["name"] == "one")
    assert one["psnr"] == pytest.approx(expected, abs=1e-6)
    assert np.mean([m["psnr"] for m in metrics["images"]]) == pytest.approx(metrics["mean_psnr"])

    # The reconstruction half equals decode(encode(center crop)) done by hand.
    tok = load_tokenizer(tiny_vqgan)
    x = torch.from_numpy(pair[:, :64]).permute(2, 0, 1)[None].float() / 255
    recon = tok.decode(tok.encode(x)).mul(255).round().byte()[0].permute(1, 2, 0).numpy()
    # (batched vs single-image float math may flip a rounding: allow 1 level on a few pixels)
    diff = np.abs(recon.astype(int) - pair[:, 64:].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_reconstruct_errors(tmp_path, tiny_vqgan, tiny_msvq, images):
    out = str(tmp_path / "o")
    result = runner.invoke(app, ["reconstruct", str(tmp_path / "nope.png"), "--tokenizer", str(tiny_vqgan), "--out", out])
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    result = runner.invoke(app, ["reconstruct", str(bad), "--tokenizer", str(tiny_vqgan), "--out", out])
    assert result.exit_code == 2 and "could be decoded" in result.output
    result = runner.invoke(app, ["reconstruct", str(images), "--tokenizer", str(tiny_vqgan), "--out", out, "--size", "60"])
    assert result.exit_code == 2 and "multiple of" in result.output
    result = runner.invoke(app, ["reconstruct", str(images), "--tokenizer", str(tiny_msvq), "--out", out, "--size", "128"])
    assert result.exit_code == 2 and "multi-scale" in result.output
    result = runner.invoke(app, ["reconstruct", str(images), "--tokenizer", str(tmp_path), "--out", out])
    assert result.exit_code == 2 and "error:" in result.output


def test_reconstruct_other_size(tmp_path, tiny_vqgan, images):
    out = tmp_path / "o96"
    result = runner.invoke(app, ["reconstruct", str(images / "cls_b"), "--tokenizer", str(tiny_vqgan), "--out", str(out), "--size", "96"])
    assert result.exit_code == 0, result.output
    assert np.array(Image.open(out / "four.png")).shape == (96, 192, 3)


def test_eval_tokenizer_multiscale_report(tmp_path, tiny_msvq, images, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no LPIPS / Inception weights here
    report = tmp_path / "report.json"
    result = runner.invoke(
        app,
        ["eval-tokenizer", str(images), "--tokenizer", str(tiny_msvq), "--workers", "0", "--batch-size", "3", "--report", str(report), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "LPIPS skipped" in result.output and "vgg16-397923af.pth" in result.output
    assert "rFID skipped" in result.output and INCEPTION_WEIGHTS_FILE in result.output
    data = json.loads(report.read_text())
    assert data["num_images"] == 4 and data["lpips"] is None and data["rfid"] is None
    assert set(data["skipped"]) == {"lpips", "rfid"}
    scales = data["codebook"]["per_scale"]
    assert [s["scale"] for s in scales] == ["1x1", "2x2", "3x3", "4x4", "6x6", "8x8"]
    assert [s["tokens"] for s in scales] == [4, 16, 36, 64, 144, 256]
    assert data["codebook"]["tokens"] == 4 * 130
    assert 0 < data["codebook"]["usage"] <= 1 and data["psnr"] > 0 and -1 <= data["ssim"] <= 1


def test_eval_tokenizer_explicit_missing_weights_is_an_error(tmp_path, tiny_vqgan, images):
    result = runner.invoke(
        app, ["eval-tokenizer", str(images), "--tokenizer", str(tiny_vqgan), "--workers", "0", "--inception-weights", str(tmp_path / "x.pth"), "--no-lpips"]
    )
    assert result.exit_code == 2 and "x.pth does not exist" in result.output
    result = runner.invoke(app, ["eval-tokenizer", str(tmp_path / "nodata"), "--tokenizer", str(tiny_vqgan)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_evaluate_tokenizer_with_lpips_and_rfid(tiny_vqgan, images, inception_weights, monkeypatch):
    """Library path with the test-only random LPIPS trunk and a random Inception made by the test."""
    use_small_inception_input(monkeypatch)
    weights = inception_weights
    opts = TokenizerEvalOptions(
        data=str(images), num=2, batch_size=2, workers=0, lpips_weights="random-for-tests",
        inception_weights=str(weights), device="cpu", progress=False,
    )
    result = evaluate_tokenizer(load_tokenizer(tiny_vqgan), opts, log=lambda m: None)
    assert result.num_images == 2 and result.skipped == {}
    assert result.lpips is not None and result.lpips > 0
    assert result.rfid is not None and result.rfid >= 0


def test_eval_fid_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    result = runner.invoke(app, ["eval-fid", str(samples), "--ref", str(samples)])
    assert result.exit_code == 2
    assert INCEPTION_WEIGHTS_FILE in result.output and str(tmp_path / "torch_home" / "hub" / "checkpoints") in result.output
    result = runner.invoke(app, ["eval-fid", str(tmp_path / "missing.npz"), "--ref", str(samples)])
    assert result.exit_code == 2 and "missing.npz does not exist" in result.output
    (tmp_path / "ref.txt").write_text("x")
    result = runner.invoke(app, ["eval-fid", str(samples), "--ref", str(tmp_path / "ref.txt")])
    assert result.exit_code == 2 and "neither an .npz" in result.output
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = runner.invoke(app, ["eval-fid", str(tmp_path / "stats.npz"), "--ref", str(samples)])
    assert result.exit_code == 2 and "only statistics" in result.output
    result = runner.invoke(app, ["eval-fid", str(samples), "--ref", str(samples), "--inception-weights", str(tmp_path / "w.pth")])
    assert result.exit_code == 2 and "w.pth does not exist" in result.output


def test_eval_fid_cli_runs(tmp_path, inception_weights, monkeypatch):
    use_small_inception_input(monkeypatch)
    weights = inception_weights
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 128, (2, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "fid.json"
    result = runner.invoke(
        app, ["eval-fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception-weights", str(weights),
              "--cache-ref", "--json", str(out), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["fid"] > 0 and data["num_samples"] == 2 and "cached to" in data["reference_stats"]
    assert (tmp_path / "r.inception-stats.npz").is_file()
    assert "FID" in result.output and "biased" in result.output
