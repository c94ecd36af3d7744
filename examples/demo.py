"""`make demo`: the whole vqtok pipeline on the bundled real photos, CPU-sized (a few minutes on 2 idle cores).

demo-data -> train-tokenizer (VQGAN, discriminator on) -> eval-tokenizer on held-out photos -> reconstruct
-> encode --ten-crop -> train-ar --anneal -> sample --cfg -> class consistency of the samples

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
# - tiny-vqgan: the headline tokenizer, a VQGAN trained with its discriminator (StyleGAN D from step 20,
#   adaptive weight) and the recipe's codebook guards (k-means init, dead-code restarts), which keep
#   ~all codes in use on held-out photos (bench/README.md, "Tokenizer quality"). LPIPS joins the loss
#   when the VGG16 file is present; without it the demo says so and trains with L1 + GAN only.
# - the recipe's 1024 codes: the held-out tiles (three zooms, below) hold 19,968 tokens, 19.5 per code, enough
#   to show a full book in use (two zooms, 6.75 per code, gave 92.2% usage for the same book).
# - TOKENIZER_OVERRIDES: the recipe's 40 steps are a smoke run. 600 steps (150 passes over the 32 photos)
#   give reconstructions where faces, cups and the cat are recognisable; with 200 the generator's samples
#   match their class markedly less often (the tokenizer's step, with its D, is the slowest part of the demo).
TOKENIZER_RECIPE = "tiny-vqgan"
TOKENIZER_OVERRIDES = ["train.steps=600", "train.log_every=50", "train.ckpt_every=600", "train.preview_every=600"]
# Held-out photos for the tokenizer evaluation: scikit-image photos that are NOT in the demo dataset,
# tiled into 64 px crops at three zooms (312 tiles of 64 tokens, 19.5 per code of the 1024-code book).
HELD_OUT_PHOTOS = ("camera.png", "coins.png", "cell.png", "microaneurysms.png", "clock_motion.png")
HELD_OUT_SIDES = (128, 256, 384)
AR_RECIPE = "rar-tiny"
# Settings on top of rar-tiny, and why: the demo's generator has to learn its 32 photos (320 ten-crop views)
# well enough that its guided samples look like them; the preset alone stays far from that at this budget.
AR_OVERRIDES = [
    "model.hidden_size=128",        # twice the preset's width and
    "model.intermediate_size=512",  # MLP, and
    "model.depth=3",                # one more block: the capacity to hold 320 token sequences
    "train.batch_size=32",          # one view of every photo in each step
    "optim.weight_decay=0",         # the model is meant to memorise its training set: nothing to decay towards
    "train.ckpt_every=400",         # one checkpoint and preview, at the end
    "train.preview_every=400",
]
AR_EPOCHS = "400"           # passes over the 32 photos: 400 steps at batch 32 (the recipe: 120 at batch 16)
ANNEAL = ("20", "60")       # random scan orders until epoch 20, linearly down to raster order (the sampling order) by 60
# Sampling: a small memorising model is best served by mild guidance and a cooler softmax; stronger guidance
# pushes its samples off the training images (the null-class rows see only the class-dropout tenth of the data).
CFG = "2.0"                 # constant guidance scale
TEMPERATURE = "0.7"
SAMPLE_ARGS = ["--cfg", CFG, "--temperature", TEMPERATURE]
# The goals, printed next to the measured figures.
GOAL_USAGE = 0.95            # held-out codebook usage
GOAL_PERPLEXITY = 0.5        # held-out perplexity, as a fraction of the codebook size
GOAL_CONSISTENCY = 0.75      # class consistency of the guided samples


class StageFailed(Exception):
    pass


def vqtok(*args: str, device: str | None = None) -> float:
    """Run one `vqtok` command as a user would; returns its wall time in seconds."""
    cmd = ["vqtok", *args] + (["--device", device] if device else [])
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    code = subprocess.run([sys.executable, "-m", *cmd], env=env).returncode
    if code != 0:
        raise StageFailed(f"`{shlex.join(cmd)}` failed with exit code {code}; its output is above.")
    seconds = time.perf_counter() - start
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def write_held_out(folder: Path, size: int = 64) -> int:
    """64 px tiles of photos the tokenizer never sees, as PNG files; returns the count."""
    from PIL import Image

    from vqtok.data.default_dataset import skimage_data_dir

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in HELD_OUT_PHOTOS:
        with Image.open(skimage_data_dir() / name) as im:
            im = im.convert("RGB")
            for side in HELD_OUT_SIDES:
                scale = side / min(im.size)
                small = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
                for top in range(0, small.height - size + 1, size):
                    for left in range(0, small.width - size + 1, size):
                        small.crop((left, top, left + size, top + size)).save(folder / f"{Path(name).stem}_{side}_{top}_{left}.png")
                        n += 1
    return n


def class_consistency(samples_npz: Path, data: Path, size: int = 64) -> tuple[float, int]:
    """Fraction of guided samples whose nearest training image (L2 in pixels at the demo resolution, over
    all ten-crop views of every training image) has the sample's class; chance is 1 / number of classes."""
    import numpy as np
    import torch

    from vqtok.data.crops import crop_views
    from vqtok.data.images import list_images, load_record

    listing = list_images(data, split="train")
    views, view_class = [], []
    for rec in listing.records:
        v = crop_views(load_record(rec).convert("RGB"), size, ten=True)
        views.append(v.reshape(v.shape[0], -1).float())
        view_class += [rec.label] * v.shape[0]
    bank, bank_class = torch.cat(views), torch.tensor(view_class)
    npz = np.load(samples_npz)
    images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).reshape(len(npz["arr_0"]), -1).float()
    nearest = torch.cdist(images, bank).argmin(1)
    hits = (bank_class[nearest] == torch.from_numpy(npz["labels"]).long()).float()
    return float(hits.mean()), len(hits)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def verdict(met: bool) -> str:
    return "(goal met)" if met else "(goal NOT met)"


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
    held_out, held_report = out / "heldout", out / "heldout.eval.json"
    from vqtok.losses.lpips import hub_vgg16_path

    overrides = list(TOKENIZER_OVERRIDES)
    if hub_vgg16_path().is_file():
        overrides.append("loss.perceptual_weight=1.0")
    else:
        print(f"LPIPS off: no VGG16 file at {hub_vgg16_path()}; the tokenizer trains with L1 + GAN losses only", flush=True)
    start, load_at_start = time.perf_counter(), load_average()
    times: dict[str, float] = {}

    def stage(*args: str, device: str | None = None) -> None:
        times[args[0]] = times.get(args[0], 0.0) + vqtok(*args, device=device)

    try:
        stage("demo-data", str(data))
        print(f"\nheld-out set: {write_held_out(held_out)} tiles of photos that are not in {data}", flush=True)
        stage("train-tokenizer", str(data), "--config", TOKENIZER_RECIPE, "--out", str(tok), *overrides, device=dev)
        stage("eval-tokenizer", str(held_out), "--tokenizer", str(tok / "final"), "--no-fid", "--no-lpips",
              "--workers", "0", "--report", str(held_report), device=dev)
        stage("reconstruct", str(data / "train" / "astronaut"), str(data / "train" / "coffee"),
              str(data / "train" / "motorcycle"), "--tokenizer", str(tok / "final"), "--out", str(recon), device=dev)
        stage("encode", str(data), "--ten-crop", "--size", "64", "--tokenizer", str(tok / "final"),
              "--out", str(tokens), device=dev)
        stage("inspect", str(tokens))
        stage("train-ar", str(tokens), "--tokenizer", str(tok / "final"), "--config", AR_RECIPE,
              "--epochs", AR_EPOCHS, "--anneal", *ANNEAL, "--out", str(rar), *AR_OVERRIDES, device=dev)
        stage("sample", "--ckpt", str(rar / "final"), "--tokenizer", str(tok / "final"), *SAMPLE_ARGS,
              "--per-class", "4", "--png", "--npz", "--out", str(samples), device=dev)
    except StageFailed as err:
        print(f"\ndemo stopped: {err}", file=sys.stderr)
        return 1
    import json

    report = json.loads(held_report.read_text())
    cb = report["codebook"]
    consistency, n = class_consistency(samples / "samples.npz", data)
    num_classes = len(json.loads((tokens / "manifest.json").read_text())["classes"])
    times["class consistency"] = time.perf_counter() - start - sum(times.values())
    total = time.perf_counter() - start
    print(f"\ndemo finished in {total / 60:.1f} min ({os.cpu_count()} CPU cores; load average {load_at_start} at the "
          f"start, {load_average()} at the end). Seconds per stage:")
    for name, seconds in times.items():
        print(f"  {name:<18} {seconds:6.0f} s")
    usage, perplexity, vocab = cb["usage"], cb["perplexity"], cb["vocab_size"]
    print(f"tokenizer on {report['num_images']} held-out tiles (goals: usage >= {GOAL_USAGE:.0%}, perplexity >= "
          f"{GOAL_PERPLEXITY} x codebook = {GOAL_PERPLEXITY * vocab:.0f}):")
    print(f"  codebook usage {usage:.1%} ({cb['codes_used']}/{vocab} codes) {verdict(usage >= GOAL_USAGE)}, "
          f"perplexity {perplexity:.0f} {verdict(perplexity >= GOAL_PERPLEXITY * vocab)}, PSNR {report['psnr']:.2f} dB")
    print(f"class consistency of the {n} guided samples (goal >= {GOAL_CONSISTENCY:.0%}; chance {1 / num_classes:.1%}): "
          f"{consistency:.1%} have a nearest training image (pixel L2 over all ten-crop views) of their own class "
          f"{verdict(consistency >= GOAL_CONSISTENCY)}")
    print("Look at:")
    print(f"  reconstructions (original | reconstruction): {recon / 'grid.png'}")
    print(f"  guided samples (8 classes x 4, class id under each): {samples / 'grid.png'}")
    print(f"  tokenizer {tok / 'final'}, token shards {tokens}, generator {rar / 'final'}, ADM npz {samples / 'samples.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
