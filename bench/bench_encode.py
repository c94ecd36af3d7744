"""Benchmark `vqtok encode`: is decoding + cropping hidden behind the model, and does memory stay flat?

Side by side in one run, same tokenizer, same batch of B images x 10 ten-crop views at --size px:
  model   tokenizer.encode on pre-decoded tensors (the ceiling)
  encode  the full pipeline (list, read, decode JPEG, ADM crop, ten-crop, encode, write shards)
Goal: encode >= 0.9 x model images/s. Then peak RSS (main process and DataLoader workers) of the
pipeline at two dataset sizes, each in a fresh subprocess: flat means it does not grow with N.

Input images are the demo photos (real JPEG/PNG, 272-1411 px; needs `pip install '.[data]'`) copied
round-robin to N files, or synthetic 500x375 JPEGs (ImageNet's typical size) with --synthetic.

    python bench/bench_encode.py --preset tiny-vqgan --size 256 --batch-size 4 --images 24 --rss-sizes 64 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, n: int, synthetic: bool) -> Path:
    d = root / "train" / "n00000000"
    d.mkdir(parents=True, exist_ok=True)
    if synthetic:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:375, 0:500] / 500.0
        for i in range(n):
            base = np.stack([np.sin(7 * x + i), np.cos(5 * y - i), np.sin(3 * (x + y) + i)], -1) * 0.4 + 0.5
            arr = np.clip(base + rng.normal(0, 0.08, base.shape), 0, 1)
            Image.fromarray((arr * 255).astype(np.uint8)).save(d / f"img_{i:06d}.JPEG", quality=90)
        return root
    from vqtok.data.default_dataset import build_default_dataset

    demo = build_default_dataset(root / "demo")
    photos = sorted((demo / "train").rglob("*.*"))
    for i in range(n):
        src = photos[i % len(photos)]
        os.link(src, d / f"img_{i:06d}{src.suffix}")
    return root


def model_throughput(tok, size: int, batch: int, views: int, seconds: float) -> float:
    x = torch.rand(batch * views, 3, size, size)
    tok.encode(x)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tok.encode(x)
        n += batch
    return n / (time.perf_counter() - start)


def pipeline_throughput(data: Path, tok_dir: Path, out: Path, args) -> float:
    from vqtok.app.encode import EncodeOptions, run_encode

    opts = EncodeOptions(input=str(data), tokenizer=str(tok_dir), out=str(out), ten_crop=True, size=args.size, allow_grid_change=True,
                         batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                         overwrite=True, device="cpu")
    start = time.perf_counter()
    manifest = run_encode(opts, log=lambda _m: None)
    elapsed = time.perf_counter() - start
    return manifest["num_samples"] / elapsed


def rss_child(args) -> None:
    """Subprocess entry: run the pipeline once and print peak RSS of this process and its workers (MiB)."""
    from vqtok.app.encode import EncodeOptions, run_encode

    run_encode(EncodeOptions(input=args.data, tokenizer=args.tok, out=args.out, ten_crop=True, size=args.size, allow_grid_change=True,
                             batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                             overwrite=True, device="cpu"), log=lambda _m: None)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak.
    main = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mib": round(main, 1), "worker_mib": round(workers, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-vqgan")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--model-seconds", type=float, default=15.0)
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[64, 512])
    p.add_argument("--rss-crop", type=int, default=64,
                   help="crop size for the RSS runs: small, so the data pipeline (not model activations) dominates")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process (0 = default)")
    p.add_argument("--rss-only", action="store_true", help="skip the throughput comparison")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data"), p.add_argument("--tok"), p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)

    from vqtok.tokenizer.tokenizer import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        torch.manual_seed(0)
        tok_dir = build_tokenizer(args.preset).save(work / "tok")
        from vqtok.tokenizer.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}, "
              f"ten-crop {args.size}px, batch {args.batch_size} images x 10 views, workers {args.workers}")
        if not args.rss_only:
            data = make_images(work / "data", args.images, args.synthetic)
            model = model_throughput(tok, args.size, args.batch_size, 10, args.model_seconds)
            pipe = pipeline_throughput(data, tok_dir, work / "out", args)
            print(f"model  (pre-decoded tensors): {model:8.2f} images/s")
            print(f"encode (full pipeline)      : {pipe:8.2f} images/s   ratio {pipe / model:.2f}x (goal >= 0.9x)")
        for n in args.rss_sizes:
            d = make_images(work / f"rss{n}", n, args.synthetic)
            res = subprocess.run([sys.executable, __file__, "--rss-child", "--data", str(d), "--tok", str(tok_dir),
                                  "--out", str(work / f"rss_out{n}"), "--size", str(args.rss_crop),
                                  "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                                  "--shard-size", str(args.shard_size), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            rss = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"peak RSS at {n:6d} images ({args.rss_crop}px crops): main {rss['main_mib']:.0f} MiB, largest worker {rss['worker_mib']:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
