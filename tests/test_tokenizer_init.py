"""`train-tokenizer --init SOURCE` (+ train.freeze): fine-tuning from a vqtok run, a tokenizer checkpoint or
official weights, with discriminator / optimizer states restored when the source has them."""

import torch
import pytest
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.errors import UserError
from vqtok.tokenizer.config import tokenizer_config_to_dict
from vqtok.tokenizer.tokenizer import Tokenizer
from vqtok.distributed import DistEnv
from vqtok.train.tokenizer_task import TokenizerTrainTask, load_run_config, train_tokenizer
from vqtok.weights import load_state_dict_file

from test_tokenizer import _randomize, _small
from test_train_tokenizer import FAST, make_photos

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source_run(photos, tmp_path_factory):
    run = tmp_path_factory.mktemp("src") / "run"
    train_tokenizer(photos, "tiny-vqgan", run, FAST + ["train.steps=2", "model.quantizer.params.kmeans_init_steps=1"])
    return run


def _task(photos, tmp_path, init, over=(), config="tiny-vqgan"):
    cfg = load_run_config(config, list(FAST) + list(over))
    return TokenizerTrainTask(cfg, DistEnv(), photos, tmp_path / "new", init=init)


def test_init_from_a_run_restores_weights_discriminator_and_optimizers(photos, tmp_path, source_run, capsys):
    task = _task(photos, tmp_path, source_run, ["model.quantizer.params.kmeans_init_steps=1"])
    out = capsys.readouterr().out
    assert "init: tokenizer weights from vqtok checkpoint" in out and "(step 2)" in out
    assert "discriminator restored" in out and "generator optimizer restored" in out and "discriminator optimizer restored" in out
    state = torch.load(source_run / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    for k, v in state["modules"]["generator"].items():
        assert torch.equal(task.tokenizer.state_dict()[k], v), k
    for k, v in state["modules"]["discriminator"].items():
        assert torch.equal(task.loss_fn.discriminator.state_dict()[k], v), k
    assert bool(task.tokenizer.quantize.initialized)  # a trained codebook is never re-seeded by k-means


def test_init_from_a_tokenizer_checkpoint_starts_discriminator_and_optimizers_fresh(photos, tmp_path, source_run, capsys):
    task = _task(photos, tmp_path, source_run / "final", ["model.quantizer.params.kmeans_init_steps=1"])
    out = capsys.readouterr().out
    assert "tokenizer checkpoint" in out and "discriminator started fresh (the source has none)" in out
    assert "generator optimizer started fresh" in out
    final = load_state_dict_file(source_run / "final" / "model.safetensors")
    for k, v in final.items():
        assert torch.equal(task.tokenizer.state_dict()[k], v), k


def test_freeze_encoder_and_quantizer_trains_only_the_decoder(photos, tmp_path, source_run, capsys):
    over = FAST + ["train.steps=3", "train.freeze=encoder,quantizer", "train.ema=false", "model.quantizer.params.kmeans_init_steps=1",
                   "model.quantizer.params.dead_code_threshold=1e9"]  # restarts would move codes if not frozen
    result = train_tokenizer(photos, "tiny-vqgan", tmp_path / "ft", over, init=source_run / "final")
    out = capsys.readouterr().out
    assert "frozen: encoder, quantizer" in out and "generator optimizer started fresh" in out
    before = load_state_dict_file(source_run / "final" / "model.safetensors")
    after = load_state_dict_file(result.final_dir / "model.safetensors")
    for k in before:
        if k.startswith(("encoder.", "quant_conv.", "quantize.")):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    with pytest.raises(UserError, match="train.freeze: unknown part 'encodr'"):
        train_tokenizer(photos, "tiny-vqgan", tmp_path / "bad", FAST + ["train.freeze=encodr"])


def test_init_from_official_weights_and_a_mismatch_names_the_preset(photos, tmp_path, source_run):
    official = _randomize(Tokenizer(_small("llamagen")))
    path = tmp_path / "official.pth"
    torch.save(official.state_dict(), path)
    model = tokenizer_config_to_dict(_small("llamagen"))
    model["quantizer"]["params"].update(kmeans_init=True, dead_code_threshold=0.1)
    cfg = load_run_config("tiny-vqgan", FAST)
    cfg.model = model
    task = TokenizerTrainTask(cfg, DistEnv(), photos, tmp_path / "new", init=path)
    for k, v in official.state_dict().items():
        assert torch.equal(task.tokenizer.state_dict()[k], v), k
    assert bool(task.tokenizer.quantize.initialized)
    # tiny-fsq weights into the tiny-vqgan model: one clear error that names the fix
    fsq = tmp_path / "fsq"
    train_tokenizer(photos, "tiny-fsq", fsq, FAST + ["train.steps=1", "train.ckpt_every=1"])
    result = runner.invoke(app, ["train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "x"),
                                 "--init", str(fsq / "final"), "--device", "cpu", *FAST])
    assert result.exit_code == 2, result.output
    assert "does not fit the configured model" in result.output and "model.preset=tiny-fsq" in result.output
    assert "Traceback" not in result.output
    missing = runner.invoke(app, ["train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "y"),
                                  "--init", str(tmp_path / "nope"), "--device", "cpu", *FAST])
    assert missing.exit_code == 2 and "--init" in missing.output and "does not exist" in missing.output
