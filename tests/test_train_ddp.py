"""Two gloo processes under torchrun train exactly what one process trains with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from vqtok.train.tokenizer_task import train_tokenizer
from vqtok.weights import load_state_dict_file

from test_train_tokenizer import FAST, make_photos


def test_two_process_gloo_run_equals_single_process(tmp_path):
    photos = make_photos(tmp_path / "photos")
    # D from step 1 with adaptive weight and LeCam: every cross-rank reduction is exercised
    # Adam eps 1e-4: conv biases in front of GroupNorm (and many D weights at init) have near-zero
    # gradients; with eps 1e-8 Adam turns their float round-off, which depends on the reduction order,
    # into lr-sized steps. The larger eps keeps the comparison about the gradients themselves.
    over = FAST + ["train.steps=3", "loss.lecam_weight=0.01", "train.ema_decay=0.5",
                   "optim.generator.eps=1e-4", "optim.discriminator.eps=1e-4"]
    single = train_tokenizer(photos, "tiny-vqgan", tmp_path / "single", over)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqtok", "train-tokenizer", str(photos), "--config", "tiny-vqgan", "--out", str(tmp_path / "ddp"),
           "--device", "cpu", *over]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("tokenizer saved to") == 1  # only rank 0 prints
    a = load_state_dict_file(single.final_dir / "model.safetensors")
    b = load_state_dict_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    sa = torch.load(single.last_checkpoint / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "ddp" / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    for k, v in sa["modules"]["discriminator"].items():
        assert torch.allclose(v, sb["modules"]["discriminator"][k], rtol=1e-4, atol=1e-5), (k, (v - sb["modules"]["discriminator"][k]).abs().max(), v.abs().max())
    assert len(sb["rng"]) == 2  # each rank's RNG state is kept
