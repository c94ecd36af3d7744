"""A run directory wherever a checkpoint is expected: RUN/final, or one line naming the latest checkpoint."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.errors import UserError
from vqtok.run_dirs import resolve_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from vqtok.tokenizer.tokenizer import build_tokenizer

    run = tmp_path_factory.mktemp("runs") / "tok"
    torch.manual_seed(0)
    build_tokenizer("tiny-vqgan").save(run / "final")
    (run / "checkpoints" / "step-00000040").mkdir(parents=True)
    return run


def _unfinished(tmp_path: Path) -> Path:
    run = tmp_path / "unfinished"
    for step in (10, 20):
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text("{}")
        (ckpt / "state.pt").write_bytes(b"")
    (run / "config.yaml").write_text("{}\n")
    return run


def test_resolution_rules(finished_run, tmp_path, capsys):
    final = finished_run / "final"
    assert resolve_checkpoint(final) == final  # a checkpoint directory stays itself
    assert resolve_checkpoint(tmp_path / "missing") == tmp_path / "missing"  # the loader reports it
    weights = tmp_path / "rar_b.bin"
    weights.write_bytes(b"x")
    assert resolve_checkpoint(weights, "--init") == weights  # files (official weights) pass through
    assert resolve_checkpoint(finished_run, "--ckpt") == final
    assert f"--ckpt {finished_run} is a run directory: using {final}" in capsys.readouterr().err
    run = _unfinished(tmp_path)
    with pytest.raises(UserError, match=r"has not finished .*latest checkpoint is .*step-00000020"):
        resolve_checkpoint(run)
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="has no checkpoint yet"):
        resolve_checkpoint(tmp_path / "fresh")


def test_reconstruct_and_eval_accept_a_run_directory(finished_run, tmp_path):
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(img)
    result = runner.invoke(app, ["reconstruct", str(img), "--tokenizer", str(finished_run), "--out", str(tmp_path / "recon"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"using {finished_run / 'final'}" in result.output
    result = runner.invoke(app, ["reconstruct", str(img), "--tokenizer", str(_unfinished(tmp_path)),
                                 "--out", str(tmp_path / "recon2"), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "error:" in result.output and "step-00000020" in result.output
    assert not (tmp_path / "recon2").exists()


def test_sample_and_train_ar_dry_run_accept_run_directories(finished_run, tmp_path):
    import json

    from vqtok.ar.checkpoint import save_generator
    from vqtok.ar.rar import RAR, RARConfig
    from vqtok.tokenizer.tokenizer import load_tokenizer

    identity = load_tokenizer(finished_run / "final").identity()
    cfg = RARConfig(hidden_size=32, depth=1, num_heads=2, intermediate_size=64, vocab_size=512, seq_len=64, num_classes=3,
                    dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    gen_run = tmp_path / "gen-run"
    save_generator(gen_run / "final", RAR(cfg), cfg, identity)
    result = runner.invoke(app, ["sample", "--ckpt", str(gen_run), "--tokenizer", str(finished_run), "--num-samples", "2",
                                 "--tokens-only", "--out", str(tmp_path / "samples"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"--ckpt {gen_run} is a run directory: using {gen_run / 'final'}" in result.output
    assert f"--tokenizer {finished_run} is a run directory" in result.output
    # train-ar --dry-run --tokenizer RUN reads RUN/final
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    manifest = {"format": "wds", "version": 1, "dtype": "uint16", "views": ["v0"], "classes": ["a", "b", "c"],
                "tokenizer": {"preset": "tiny-vqgan", "hash": identity["hash"], "vocab_size": 512, "scales": [[8, 8]],
                              "tokens_per_view": 64},
                "num_samples": 12, "num_skipped": 0, "shards": [{"name": "tokens-000000.tar", "count": 12}]}
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(finished_run), "--config", "rar-tiny",
                                 "--out", str(tmp_path / "plan"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["tokenizer"] == str(finished_run / "final")
