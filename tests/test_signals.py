"""Stop signals end runs cleanly: training saves and exits 128 + signal with DataLoader workers alive
(SIGTERM sent to the whole process group, as SLURM does); other commands clean up and exit likewise;
length and schedule sanity checks at the start of a run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import process_group, signal_group
from test_train_ar import make_token_dir

from vqtok.ar.annealing import PermutationAnnealing, annealing_warning
from vqtok.cli import app
from vqtok.signals import Interrupted, ignore_stop_signals, raise_on_stop_signals

runner = CliRunner()
FAST = ["epochs=null", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=100000",
        "train.preview_every=100000", "optim.schedule.warmup=0", "train.ema=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from vqtok.tokenizer.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("sig")
    torch.manual_seed(0)
    tok = build_tokenizer("tiny-vqgan")
    tok.save(root / "tok")
    data = np.random.default_rng(0).integers(0, 512, (12, 2, 64))
    tokens = make_token_dir(root / "tokens", tok.identity(), data, [i % 3 for i in range(12)])
    return root / "tok", tokens


def _wait_for_rows(run: Path, proc: subprocess.Popen, rows: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not start training in time")


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_143(tmp_path, setup):
    tok, tokens = setup
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vqtok", "train-ar", str(tokens), "--tokenizer", str(tok), "--config", "rar-tiny",
           "--device", "cpu", "--out", str(run), *FAST, "train.steps=100000", "train.num_workers=2",
           "--anneal", "0", "1", "--anneal-unit", "steps"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a session of its own: the signal goes to the main process and its DataLoader workers alike
    with process_group(cmd, env) as proc:
        _wait_for_rows(run, proc, rows=3)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2, "expected two DataLoader worker processes"
        out, err = signal_group(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert "--resume auto" in err and "SIGTERM" in err
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and not (run / "final").exists()
    step = int(checkpoints[0].name.split("-")[1])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert step >= 3 and rows[-1]["step"] == step

    # resuming past the configured end names both numbers
    common = [str(tokens), "--tokenizer", str(tok), "--config", "rar-tiny", "--device", "cpu", "--out", str(run),
              "--resume", "auto", *FAST, "--anneal", "0", "1", "--anneal-unit", "steps", "train.num_workers=0"]
    short = runner.invoke(app, ["train-ar", *common, f"train.steps={step - 1}"])
    assert short.exit_code == 2, short.output
    assert f"step {step}" in short.output and f"step {step - 1}" in short.output
    assert len(short.output.strip().splitlines()) == 1
    # and a longer length continues to the end
    done = runner.invoke(app, ["train-ar", *common, f"train.steps={step + 2}"])
    assert done.exit_code == 0, done.output
    assert (run / "final" / "model.safetensors").is_file()
    # the generator records the manifest's class names (sample grids show them)
    assert json.loads((run / "final" / "generator.json").read_text())["classes"] == ["class0", "class1", "class2"]


def test_sigterm_during_encode_cleans_up_and_exits_143(tmp_path, setup):
    from PIL import Image

    tok, _ = setup
    data = tmp_path / "data" / "train"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(data / f"c{c}" / f"{i}.png")
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "vqtok", "encode", str(tmp_path / "data"), "--tokenizer", str(tok), "--out", str(out),
           "--size", "64", "--ten-crop", "--shard-size", "8", "--batch-size", "1", "--workers", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with process_group(cmd, env) as proc:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("tokens-*.tar")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        _, err = signal_group(proc, signal.SIGTERM)
    if proc.returncode == 0:
        pytest.skip("encode finished before the signal arrived (machine too fast for this input)")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "error: encode interrupted by SIGTERM" in err, err[-3000:]
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tokens-")], "a half-written shard was left behind"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 80


def test_raise_on_stop_signals_runs_finally_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Interrupted) as info:
        with raise_on_stop_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                cleaned.append(True)
    assert cleaned and info.value.exit_code == 143 and "SIGTERM" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_workers_ignore_stop_signals():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_annealing_warning_says_which_order_is_sampled():
    # default 200 -> 300 epochs with a 5-epoch run: r = 1 throughout
    text = annealing_warning(PermutationAnnealing(200, 300, "epoch"), total_steps=50, steps_per_epoch=10, order="raster")
    assert "r = 1 for the whole run" in text and "raster order" in text and "\n" not in text
    # ends after the run: r still > 0 at the last step
    text = annealing_warning(PermutationAnnealing(0, 20, "step"), total_steps=10, steps_per_epoch=3, order="spiral-in")
    assert "r is still 0.55" in text and "spiral-in" in text
    # reaching r = 0 before the end: no warning
    assert annealing_warning(PermutationAnnealing(1, 3, "epoch"), total_steps=40, steps_per_epoch=10, order="raster") is None


def test_train_ar_prints_the_annealing_warning(tmp_path, setup):
    tok, tokens = setup
    result = runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tok), "--config", "rar-tiny", "--device", "cpu",
                                 "--out", str(tmp_path / "run"), *FAST, "train.steps=2", "train.num_workers=0",
                                 "--anneal", "200", "300"])
    assert result.exit_code == 0, result.output
    assert "warning: annealing 200 -> 300 epochs ends after the run" in result.output


def test_sigterm_during_sample_removes_its_work_dir_and_exits_143(tmp_path, setup, monkeypatch):
    import torch

    import vqtok.app.sample as generate
    from vqtok.ar.checkpoint import save_generator
    from vqtok.ar.rar import RAR, RARConfig
    from vqtok.tokenizer.tokenizer import load_tokenizer

    tok, _ = setup
    identity = load_tokenizer(tok).identity()
    cfg = RARConfig(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, vocab_size=512, seq_len=64, num_classes=3)
    torch.manual_seed(0)
    save_generator(tmp_path / "gen", RAR(cfg), cfg, identity)
    original = generate.sample  # the one sampling loop run_sampling calls per batch

    def then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(generate, "sample", then_signal)
    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "gen"), "--tokenizer", str(tok), "--per-class", "4",
                                 "--batch-size", "4", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 143, result.output
    assert "error: sample interrupted by SIGTERM" in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".samples*"))


def test_a_process_exits_promptly_with_an_unclosed_loader_whose_workers_ignore_sigterm(tmp_path):
    # multiprocessing ends daemonic children at exit with SIGTERM, which these workers ignore, then joins them
    # without a timeout: without vqtok's exit hook the interpreter hangs after its last line (seen when an
    # error left a DataLoader iterator alive in a traceback)
    script = tmp_path / "leak.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from vqtok.signals import loader_worker_init\n"
        "loader = DataLoader(list(range(1000)), batch_size=1, num_workers=2, worker_init_fn=loader_worker_init())\n"
        "KEEP = iter(loader)\n"
        "next(KEEP)\n"
        "print('done', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
