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
