"""`make demo`: the whole vqtok pipeline on the bundled real photos, CPU-sized (about 5-8 minutes on 2 cores).

demo-data -> train-tokenizer -> reconstruct -> encode --ten-crop -> train-ar --anneal -> sample --cfg

Every stage runs as the user command (`python -m vqtok ...`), printed before it runs, so the output doubles as a
walk-through (examples/tiny_cpu_walkthrough.md explains each command). Everything lands in demo_out/.

    python examples/demo.py [--out demo_out] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Settings on top of the recipes, and why:
# - tiny-fsq: FSQ has no codebook to collapse, so a few hundred CPU steps already give recognisable
#   reconstructions; the tiny VQ recipe needs many more steps before its codes spread out.
# - TOKENIZER_OVERRIDES: the recipe's 40 steps are a smoke run (L1 error still ~0.4, blurred colour
#   fields). 600 steps (150 passes over the 32 photos, about 2 minutes on an idle 2-core CPU) bring the L1
#   error to ~0.15 and reconstructions where faces, cups and the cat are recognisable (200 steps: ~0.23 and
#   blurred). The discriminator stays off: at this scale it doubles the step time and does not help in so
#   few steps.
TOKENIZER_RECIPE = "tiny-fsq"
TOKENIZER_OVERRIDES = ["train.steps=600", "loss.disc_start=100000", "train.log_every=50",
                       "train.ckpt_every=600", "train.preview_every=600"]
AR_RECIPE = "rar-tiny"      # 120 epochs over the 32 photos (one random ten-crop view each), batch 16
ANNEAL = ("40", "80")       # random scan orders until epoch 40, linearly down to raster order by epoch 80
CFG = "3.0"                 # constant guidance scale; the 8 classes are few and the model tiny


class StageFailed(Exception):
    pass


def vqtok(*args: str, device: str | None = None) -> None:
    cmd = ["vqtok", *args] + (["--device", device] if device else [])
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    code = subprocess.run([sys.executable, "-m", *cmd], env=env).returncode
    if code != 0:
        raise StageFailed(f"`{shlex.join(cmd)}` failed with exit code {code}; its output is above.")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (replaced on each run)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: what vqtok picks)")
    args = parser.parse_args()
    out: Path = args.out
    dev = args.device

    if out.exists():
        print(f"removing the previous demo output {out}/", flush=True)
        shutil.rmtree(out)
    data, tok, recon, tokens, rar, samples = (out / n for n in ("data", "runs/tok", "recon", "tokens", "runs/rar", "samples"))
    start = time.perf_counter()
    try:
        vqtok("demo-data", str(data))
        vqtok("train-tokenizer", str(data), "--config", TOKENIZER_RECIPE, "--out", str(tok), *TOKENIZER_OVERRIDES, device=dev)
        vqtok("reconstruct", str(data / "train" / "astronaut"), str(data / "train" / "coffee"),
              str(data / "train" / "motorcycle"), "--tokenizer", str(tok / "final"), "--out", str(recon), device=dev)
        vqtok("encode", str(data), "--ten-crop", "--size", "64", "--tokenizer", str(tok / "final"),
              "--out", str(tokens), device=dev)
        vqtok("inspect", str(tokens))
        vqtok("train-ar", str(tokens), "--tokenizer", str(tok / "final"), "--config", AR_RECIPE,
              "--anneal", *ANNEAL, "--out", str(rar), device=dev)
        vqtok("sample", "--ckpt", str(rar / "final"), "--tokenizer", str(tok / "final"), "--cfg", CFG,
              "--per-class", "4", "--png", "--npz", "--out", str(samples), device=dev)
    except StageFailed as err:
        print(f"\ndemo stopped: {err}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min. Look at:")
    print(f"  reconstructions (original | reconstruction): {recon / 'grid.png'}")
    print(f"  guided samples (8 classes x 4, class id under each): {samples / 'grid.png'}")
    print(f"  tokenizer {tok / 'final'}, token shards {tokens}, generator {rar / 'final'}, ADM npz {samples / 'samples.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
