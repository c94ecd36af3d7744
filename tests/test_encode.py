"""`vqtok encode` and `vqtok inspect` end to end on CPU with the tiny-vqgan tokenizer."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import smooth_photo
from vqtok.cli import app
from vqtok.data.crops import crop_views
from vqtok.data.images import load_record, list_images
from vqtok.data.token_shards import iter_samples, open_token_dataset, read_manifest

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from vqtok.tokenizer.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return str(build_tokenizer("tiny-vqgan").save(tmp_path_factory.mktemp("tok") / "tiny"))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    seed = 0
    for wnid in ("n02000000", "n01000000", "n03000000"):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for i in range(3):
            seed += 1
            smooth_photo(90 + 7 * seed, 70 + 3 * seed, seed).save(d / f"{wnid}_{i}.JPEG", quality=90)
    return root


def _encode(args, expect=0):
    result = runner.invoke(app, ["encode", *map(str, args)])
    assert result.exit_code == expect, result.output + str(result.exception)
    return result


def _samples(out):
    return {k: (t, c) for k, t, c in iter_samples(out)}


def test_ten_crop_encode_matches_the_tokenizer_on_each_crop(tmp_path, imagenet, tokenizer_dir):
    from vqtok.tokenizer.tokenizer import load_tokenizer

    out = tmp_path / "tokens"
    _encode([imagenet, "--tokenizer", tokenizer_dir, "--out", out, "--ten-crop", "--size", 64,
             "--shard-size", 4, "--batch-size", 3, "--workers", 2, "--device", "cpu"])
    m = read_manifest(out)
    assert m["num_samples"] == 9 and m["num_skipped"] == 0 and [s["count"] for s in m["shards"]] == [4, 4, 1]
    assert m["classes"] == ["n01000000", "n02000000", "n03000000"] and m["dtype"] == "uint16"
    assert m["tokenizer"]["tokens_per_view"] == 64 and m["tokenizer"]["scale_offsets"] == [0, 64]
    assert m["views"][5] == "tl_flip" and m["geometry"]["center_crop"] == 70
    samples = _samples(out)
    assert samples["n01000000_0"][1] == 0 and samples["n03000000_2"][1] == 2
    # decode(tokens) of a shard sample equals the tokenizer's reconstruction of that crop.
    tok = load_tokenizer(tokenizer_dir)
    record = next(r for r in list_images(imagenet).records if r.key == "n02000000_1")
    crops = crop_views(load_record(record), 64, ten=True).float() / 255
    tokens, cls = samples["n02000000_1"]
    assert tokens.shape == (10, 64) and cls == 1
    assert torch.equal(torch.from_numpy(tokens.astype(np.int64)), tok.encode(crops))
    with torch.no_grad():
        recon = tok(crops).recon.clamp(0, 1)
    assert torch.allclose(tok.decode(torch.from_numpy(tokens.astype(np.int64))), recon, atol=1e-5)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "status        OK" in result.output


def test_wds_and_h5_hold_the_same_samples(tmp_path, imagenet, tokenizer_dir):
    common = ["--tokenizer", tokenizer_dir, "--size", 64, "--shard-size", 5, "--workers", 0, "--device", "cpu"]
    _encode([imagenet, "--out", tmp_path / "w", *common])
    _encode([imagenet, "--out", tmp_path / "h", "--format", "h5", *common])
    w, h = _samples(tmp_path / "w"), _samples(tmp_path / "h")
    assert list(w) == list(h) and len(w) == 9
    for k in w:
        assert np.array_equal(w[k][0], h[k][0]) and w[k][0].shape == (2, 64) and w[k][1] == h[k][1]
    assert sorted(os.listdir(tmp_path / "h")) == ["manifest.json", "skipped.jsonl", "tokens.h5"]
    _, ds = open_token_dataset(tmp_path / "h", view=1)
    t, c = ds[0]
    assert torch.equal(t, torch.from_numpy(next(iter(h.values()))[0][1].astype(np.int64)))
    assert runner.invoke(app, ["inspect", str(tmp_path / "h")]).exit_code == 0


def _bad_files_dir(root):
    d = root / "train" / "n00000001"
    d.mkdir(parents=True)
    rgb = smooth_photo(80, 72, 5)
    for name, img in (("cmyk", rgb.convert("CMYK")), ("gray", rgb.convert("L"))):
        img.save(d / f"{name}.JPEG", format="JPEG")
    rgb.convert("P").save(d / "palette.png")
    Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)).save(d / "sixteen.png")
    rgb.save(d / "disguised.JPEG", format="PNG")
    buf = io.BytesIO()
    smooth_photo(300, 300, 6).save(buf, format="JPEG")
    (d / "truncated.JPEG").write_bytes(buf.getvalue()[:700])
    (d / "zero.JPEG").write_bytes(b"")
    (d / "text.JPEG").write_text("<html>404 not found</html>")
    return root


def test_bad_files_are_encoded_or_skipped_and_strict_is_fatal(tmp_path, tokenizer_dir):
    root = _bad_files_dir(tmp_path / "in")
    out = tmp_path / "out"
    result = _encode([root, "--tokenizer", tokenizer_dir, "--out", out, "--size", 64, "--workers", 0, "--device", "cpu"])
    assert "skipped 3 input(s)" in result.output
    samples = _samples(out)
    assert sorted(samples) == ["cmyk", "disguised", "gray", "palette", "sixteen"]
    skipped = {json.loads(line)["key"]: json.loads(line)["reason"] for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert skipped["zero"].startswith("empty file") and skipped["text"].startswith("not an image")
    assert skipped["truncated"].startswith("truncated or corrupt")
    assert read_manifest(out)["num_skipped"] == 3
    strict = runner.invoke(app, ["encode", str(root), "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "strict"),
                                 "--size", "64", "--workers", "0", "--strict", "--device", "cpu"])
    assert strict.exit_code == 2
    assert "cannot decode" in strict.output and "--strict" in strict.output


def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path, imagenet, tokenizer_dir):
    out = tmp_path / "t"
    base = [imagenet, "--tokenizer", tokenizer_dir, "--out", out, "--size", 64, "--workers", 0, "--device", "cpu"]
    _encode(base)
    assert "already complete" in _encode(base).output
    refused = _encode([*base, "--ten-crop"], expect=2)
    assert "different settings" in refused.output and "ten_crop" in refused.output
    _encode([*base, "--ten-crop", "--overwrite"])
    assert read_manifest(out)["geometry"]["mode"] == "ten_crop"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("keep me")
    assert "not empty" in _encode([*base[:3], "--out", tmp_path / "other", *base[5:]], expect=2).output


def test_bad_arguments_are_one_line_errors(tmp_path, imagenet, tokenizer_dir):
    r = _encode([imagenet, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x", "--size", 60, "--device", "cpu"], expect=2)
    assert "multiple of" in r.output
    r = _encode([tmp_path / "nothing", "--tokenizer", tokenizer_dir, "--out", tmp_path / "x"], expect=2)
    assert "does not exist" in r.output
    r = _encode([imagenet, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x", "--format", "zip"], expect=2)
    assert "--format" in r.output


def test_inspect_fails_on_a_broken_directory(tmp_path, imagenet, tokenizer_dir):
    out = tmp_path / "t"
    _encode([imagenet, "--tokenizer", tokenizer_dir, "--out", out, "--size", 64, "--shard-size", 4, "--workers", 0, "--device", "cpu"])
    (out / "tokens-000001.tar").unlink()
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 2 and "tokens-000001.tar is missing" in r.output
    m = json.loads((out / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] = 3
    shutil.copy(out / "tokens-000000.tar", out / "tokens-000001.tar")
    (out / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 2 and "outside the vocabulary" in r.output
    assert runner.invoke(app, ["inspect", str(tmp_path / "nope")]).exit_code == 2


def _cli(*args):
    return [sys.executable, "-m", "vqtok", "encode", *map(str, args)]


def test_resume_after_killing_a_real_encode_process(tmp_path, tokenizer_dir):
    root = tmp_path / "in"
    (root / "c").mkdir(parents=True)
    for i in range(16):
        smooth_photo(100, 80, i).save(root / "c" / f"c_{i:03d}.JPEG")
    # One image per shard and per batch: many shard boundaries to be killed between.
    args = [root, "--tokenizer", tokenizer_dir, "--ten-crop", "--size", 64, "--shard-size", 1,
            "--batch-size", 1, "--workers", 0, "--device", "cpu"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"  # the child's output, shown whenever an assertion about it fails
    with open(log, "wb") as fh:
        proc = subprocess.Popen(_cli(*args, "--out", out), env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and not (out / "tokens-000001.tar").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    child = f"\n--- output of the killed encode ---\n{log.read_text(errors='replace')[-4000:]}"
    assert not (out / "manifest.json").exists(), "encode finished before it could be killed; make the job larger" + child
    finished_before = sorted(p.name for p in out.glob("tokens-*.tar"))
    assert finished_before, "the killed encode wrote no finished shard" + child
    rerun = subprocess.run(_cli(*args, "--out", out), env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, child + "\n--- rerun ---\n" + rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout, rerun.stdout + rerun.stderr
    keys = [k for k, _, _ in iter_samples(out)]
    assert len(keys) == 16 and len(set(keys)) == 16
    assert not list(out.rglob(".*tmp*")) and not (out / "progress").exists()
    # The resumed output equals an uninterrupted run, byte for byte.
    clean = tmp_path / "clean"
    _encode([*args[:1], "--out", clean, *args[1:]])
    for shard in read_manifest(clean)["shards"]:
        assert (out / shard["name"]).read_bytes() == (clean / shard["name"]).read_bytes()


def test_two_process_torchrun_equals_one_process(tmp_path, imagenet, tokenizer_dir):
    args = [imagenet, "--tokenizer", tokenizer_dir, "--ten-crop", "--size", 64, "--shard-size", 2, "--workers", 0, "--device", "cpu"]
    one = tmp_path / "one"
    _encode([*args[:1], "--out", one, *args[1:]])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vqtok", "encode",
           *map(str, args), "--out", str(two)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    m1, m2 = read_manifest(one), read_manifest(two)
    assert m1["shards"] == m2["shards"] and m2["num_samples"] == 9
    for shard in m1["shards"]:
        assert (one / shard["name"]).read_bytes() == (two / shard["name"]).read_bytes()


def test_multi_scale_tokenizer_concatenates_scales(tmp_path, imagenet):
    from vqtok.tokenizer.tokenizer import build_tokenizer, load_tokenizer

    torch.manual_seed(0)
    tok_dir = build_tokenizer("tiny-msvq").save(tmp_path / "msvq")
    tok = load_tokenizer(tok_dir)
    out = tmp_path / "t"
    _encode([imagenet, "--tokenizer", tok_dir, "--out", out, "--size", tok.resolution, "--workers", 0, "--device", "cpu"])
    m = read_manifest(out)
    offsets = m["tokenizer"]["scale_offsets"]
    assert m["tokenizer"]["scales"] == [list(s) for s in tok.scales] and len(offsets) == len(tok.scales) + 1
    assert offsets[-1] == tok.tokens_per_image == m["tokenizer"]["tokens_per_view"]
    record = list_images(imagenet).records[0]
    tokens, _ = _samples(out)[record.key]
    crops = crop_views(load_record(record), tok.resolution, ten=False).float() / 255
    assert torch.equal(torch.from_numpy(tokens.astype(np.int64)), tok.encode(crops))
    r = _encode([imagenet, "--tokenizer", tok_dir, "--out", tmp_path / "u", "--size", 2 * tok.resolution], expect=2)
    assert "multi-scale" in r.output
