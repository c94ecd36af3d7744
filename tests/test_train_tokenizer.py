"""train-tokenizer end to end on tiny configs: every tiny recipe, overfitting real photos, exact resume,
clean stops (signal, NaN) and bad input."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_photos  # noqa: F401 (other test modules import it from here)
from vqtok.cli import app
from vqtok.config import list_recipes
from vqtok.distributed import DistEnv
from vqtok.errors import ConfigError, UserError
from vqtok.losses.tokenizer_loss import TokenizerLoss
from vqtok.tokenizer.tokenizer import load_tokenizer
from vqtok.train.engine import TrainingDiverged
from vqtok.train.tokenizer_task import TokenizerTrainTask, load_run_config, train_tokenizer
from vqtok.weights import load_state_dict_file



# small and fast: 32 px, batch 4, disc on from step 1 so every loss term and both phases run
FAST = ["data.resolution=32", "train.batch_size=4", "train.num_workers=0", "train.log_every=1",
        "train.ckpt_every=2", "train.preview_every=2", "loss.disc_start=1", "data.preview_images=2"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_and_full_recipes_exist():
    names = set(list_recipes("tokenizer"))
    for q in ("vqgan", "fsq", "lfq", "msvq"):
        assert f"tiny-{q}" in names
    assert {"vqgan-f16", "fsq-f16", "lfq-llamagen-f16", "msvq-f16"} <= names  # lfq: LlamaGen's autoencoder, not Open-MAGVIT2's


@pytest.mark.parametrize("recipe", ["tiny-vqgan", "tiny-fsq", "tiny-lfq", "tiny-msvq"])
def test_every_tiny_recipe_trains_a_few_steps(recipe, photos, tmp_path):
    over = FAST + ["train.steps=2"]
    if recipe == "tiny-msvq":  # multi-scale tokenizers train at their own resolution (64)
        over = [o for o in over if not o.startswith("data.resolution")] + ["train.batch_size=2"]
    result = train_tokenizer(photos, recipe, tmp_path / "run", over)
    assert result.step == 2 and result.final_dir is not None
    log = rows(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert {"step", "epoch", "lr", "loss", "rec_l1", "quant"} <= set(r)
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert "d_loss" in log[-1] and "g_adv" in log[-1]  # D trained and G saw it
    tok = load_tokenizer(result.final_dir)
    assert tok.config.preset == recipe
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "previews" / "step-00000002.png").is_file()


def psnr(tok, images):
    with torch.no_grad():
        rec = tok.decode(tok.encode(images))
    mse = (rec - images).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def test_overfitting_eight_photos_raises_psnr(tmp_path):
    from torchvision.transforms.functional import pil_to_tensor

    photos = make_photos(tmp_path / "photos24", side=24)  # exactly the training crop: no augmentation
    images = torch.stack([pil_to_tensor(Image.open(p)).float() / 255 for p in sorted(photos.iterdir())])
    over = ["data.resolution=24", "data.scale_range=[1.0,1.0]", "data.hflip=false", "train.batch_size=8",
            "train.steps=30", "train.num_workers=0", "train.log_every=10", "train.ckpt_every=30",
            "train.preview_every=30", "train.ema=false", "loss.disc_weight=0",
            "optim.generator.lr=1.5e-3", "optim.generator.schedule.kind=constant"]
    from vqtok.tokenizer.tokenizer import build_tokenizer

    torch.manual_seed(0)
    before = psnr(build_tokenizer("tiny-vqgan").eval(), images)
    result = train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over)
    after = psnr(load_tokenizer(result.final_dir), images)
    assert after > before + 4.0, (before, after)


def _states_equal(a: Path, b: Path):
    sa, sb = load_state_dict_file(a / "model.safetensors"), load_state_dict_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_is_bit_identical(photos, tmp_path):
    over = FAST + ["train.steps=4", "loss.lecam_weight=0.01", "train.ema_decay=0.5"]
    full = train_tokenizer(photos, "tiny-vqgan", tmp_path / "full", over)
    half = train_tokenizer(photos, "tiny-vqgan", tmp_path / "half", over, stop_after=2)
    assert half.final_dir is None and half.step == 2
    with pytest.raises(UserError, match="--resume auto"):
        train_tokenizer(photos, "tiny-vqgan", tmp_path / "half", over)
    rest = train_tokenizer(photos, "tiny-vqgan", tmp_path / "half", over, resume=True)
    assert rest.step == 4
    _states_equal(full.final_dir, rest.final_dir)  # EMA weights
    a = torch.load(full.last_checkpoint / "state.pt", weights_only=True)
    b = torch.load(rest.last_checkpoint / "state.pt", weights_only=True)
    for name in ("generator", "discriminator"):
        for k, v in a["modules"][name].items():
            assert torch.equal(v, b["modules"][name][k]), (name, k)
    assert torch.equal(a["task"]["lecam"]["ema_real"], b["task"]["lecam"]["ema_real"])
    assert [r["step"] for r in rows(tmp_path / "half")] == [1, 2, 3, 4]
    assert rows(tmp_path / "half")[-1]["loss"] == rows(tmp_path / "full")[-1]["loss"]


def test_channels_last_trains_as_the_contiguous_layout(photos, tmp_path):
    """train.channels_last (the default) only changes the conv weights' memory layout: the parameters, the
    optimizer moments and the checkpoint hold NHWC 4-D tensors, and the run's losses and weights match
    a train.channels_last=false run up to float rounding."""
    over = FAST + ["train.steps=3", "train.ckpt_every=3"]
    # Adam's first steps move a weight by about lr (9e-4 at step 3) whatever the gradient's size, so a
    # rounding-level change in a tiny gradient can flip one step's sign: two such steps at most
    ADAM_FLIP = 2e-3
    runs = {flag: train_tokenizer(photos, "tiny-vqgan", tmp_path / flag, over + [f"train.channels_last={flag}"])
            for flag in ("true", "false")}
    states = {f: torch.load(r.last_checkpoint / "state.pt", weights_only=True) for f, r in runs.items()}
    for name in ("generator", "discriminator"):
        convs = [k for k, v in states["true"]["modules"][name].items() if v.ndim == 4 and v.shape[-1] > 1]
        assert convs, name
        for k in convs:
            nhwc, nchw = states["true"]["modules"][name][k], states["false"]["modules"][name][k]
            assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous(), (name, k)
            assert nchw.is_contiguous(), (name, k)
            torch.testing.assert_close(nhwc, nchw, rtol=0, atol=ADAM_FLIP)
    moments = [s["exp_avg"] for s in states["true"]["optimizers"]["generator"]["state"].values() if s["exp_avg"].ndim == 4]
    assert moments and all(m.is_contiguous(memory_format=torch.channels_last) for m in moments if m.shape[-1] > 1)
    for a, b in zip(rows(tmp_path / "true"), rows(tmp_path / "false")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a["step"], a["loss"], b["loss"])
    sa = load_state_dict_file(runs["true"].final_dir / "model.safetensors")
    sb = load_state_dict_file(runs["false"].final_dir / "model.safetensors")
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=ADAM_FLIP)


@pytest.mark.parametrize("adaptive", ["true", "false"])
def test_shared_fake_forward_trains_as_two_forwards(photos, tmp_path, adaptive):
    """loss.share_fake_forward (the default) runs D once on the reconstruction per step, for both passes:
    losses, D's logits and every weight of both networks (and LeCam's EMAs) are those of separate forwards."""
    over = FAST + ["train.steps=3", "train.ckpt_every=3", f"loss.adaptive_weight={adaptive}", "loss.lecam_weight=0.1"]
    runs = {flag: train_tokenizer(photos, "tiny-vqgan", tmp_path / flag, over + [f"loss.share_fake_forward={flag}"])
            for flag in ("true", "false")}
    shared, separate = rows(tmp_path / "true"), rows(tmp_path / "false")
    assert any("logits_fake" in r for r in shared)
    assert [sorted(r) for r in shared] == [sorted(r) for r in separate]
    for a, b in zip(shared, separate):
        for key in {"loss", "g_adv", "adv_weight", "d_loss", "logits_fake", "logits_real", "lecam"} & set(a):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    # with the adaptive weight both ways run the same ops; without it, G's adversarial gradient is D's
    # backward from 1 scaled by the weight instead of D's backward from the weight, a rounding-level change
    # that Adam turns into a step of about lr where a gradient is rounding noise (biases before a norm)
    atol = 1e-6 if adaptive == "true" else 2e-3
    states = {f: torch.load(r.last_checkpoint / "state.pt", weights_only=True) for f, r in runs.items()}
    for name in ("generator", "discriminator"):
        for k, v in states["true"]["modules"][name].items():
            torch.testing.assert_close(v, states["false"]["modules"][name][k], rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{name} {k}: {m}")


def test_shared_fake_forward_needs_one_micro_batch_and_no_batchnorm(photos, tmp_path):
    """A BatchNorm discriminator (its running statistics count forwards) and grad_accum > 1 (one D graph
    per micro-batch would wait) keep two forwards."""
    def task(*over):
        cfg = load_run_config("tiny-vqgan", FAST + list(over))
        return TokenizerTrainTask(cfg, DistEnv(device=torch.device("cpu")), photos, tmp_path / "run")

    assert task()._share_fake
    assert not task("train.grad_accum=2")._share_fake
    assert not task("loss.disc.kind=patchgan")._share_fake
    assert not task("loss.share_fake_forward=false")._share_fake


def test_sigterm_saves_and_resume_finishes(photos, tmp_path, monkeypatch):
    original = TokenizerLoss.generator_loss

    def loss_then_signal(self, images, recon, aux, step, last_layer, keep_fake=False):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, images, recon, aux, step, last_layer, keep_fake)

    monkeypatch.setattr(TokenizerLoss, "generator_loss", loss_then_signal)
    over = FAST + ["train.steps=3", "train.ckpt_every=100"]
    result = train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over)
    assert result.interrupted and result.step == 2 and result.final_dir is None
    assert result.last_checkpoint.name == "step-00000002"
    monkeypatch.setattr(TokenizerLoss, "generator_loss", original)
    done = train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over, resume=True)
    assert done.step == 3 and done.final_dir.is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(photos, tmp_path, monkeypatch):
    original = TokenizerLoss.generator_loss

    def nan_at_step_3(self, images, recon, aux, step, last_layer, keep_fake=False):
        loss, metrics, fake = original(self, images, recon, aux, step, last_layer, keep_fake)
        return (loss * float("nan") if step == 3 else loss), metrics, fake

    monkeypatch.setattr(TokenizerLoss, "generator_loss", nan_at_step_3)
    over = FAST + ["train.steps=6"]
    with pytest.raises(TrainingDiverged, match="non-finite at step 3.*step-00000002"):
        train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]
    assert not (tmp_path / "run" / "final").exists()


def test_corrupt_images_are_skipped_and_counted(photos, tmp_path):
    data = make_photos(tmp_path / "data")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (data / "empty.jpg").write_bytes(b"")
    over = FAST + ["train.steps=3", "train.batch_size=10", "loss.disc_weight=0"]
    result = train_tokenizer(data, "tiny-vqgan", tmp_path / "run", over)
    assert result.final_dir is not None
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {Path(s["source"]).name for s in skipped} == {"broken.png", "empty.jpg"}
    assert rows(tmp_path / "run")[-1]["skipped_images"] >= 2


def test_bad_input_is_one_clear_error(photos, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'loss.lpips_wieghts'"):
        train_tokenizer(photos, "tiny-vqgan", tmp_path / "a", ["loss.lpips_wieghts=x"])
    with pytest.raises(UserError, match="not divisible by the tokenizer's downsampling factor 8"):
        train_tokenizer(photos, "tiny-vqgan", tmp_path / "b", ["data.resolution=36"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        train_tokenizer(tmp_path / "empty", "tiny-vqgan", tmp_path / "c")
    for run in ("a", "b", "c"):
        assert not (tmp_path / run / "checkpoints").exists()


def test_cli_exit_codes(photos, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "r"),
                              "train.stepz=3"])
    assert bad.exit_code == 2 and "unknown config key 'train.stepz'" in bad.output
    missing = runner.invoke(app, ["train-tokenizer", str(tmp_path / "nope"), "--config", "tiny-vqgan", "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    ok = runner.invoke(app, ["train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "r"),
                             *FAST, "train.steps=1", "loss.disc_weight=0"])
    assert ok.exit_code == 0, ok.output
    assert "tokenizer saved to" in ok.output
    again = runner.invoke(app, ["train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "r"),
                                *FAST, "train.steps=1"])
    assert again.exit_code == 2 and "--resume auto" in again.output
