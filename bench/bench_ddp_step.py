"""DDP step time: the AR task's gradient all-reduce overlapped with backward (DDP) vs the explicit path.

Two processes (torchrun, gloo on CPU by default; NCCL with --device cuda on a 2-GPU machine) each build the
real `ARTrainTask` (a RAR of --hidden x --depth on synthetic token shards of a tiny-vqgan tokenizer, written
to a temporary folder) twice from the same initial weights: once with its own grad_sync "ddp" (DDP
buckets all-reduced while backward runs, `no_sync()` on accumulation micro-steps) and once switched to
"explicit" (one bucketed all-reduce after backward). Every timed step is `Engine.train_step` on the same
fixed batch with the same threads; the two paths alternate in blocks (A B, B A, ...), and a barrier lines
the ranks up before every step. A third path, "local", times each rank training its share of the batch
with a one-process engine and no gradient exchange, concurrently: the compute part of a step under the
same CPU contention, so `path - local` is what the exchange costs. A step's time is the slower rank's. After timing, the two tasks' weights
are compared: both paths trained the same steps on the same batches, so they must agree.

    python bench/bench_ddp_step.py                               # hidden 256 x 8 layers, batch 16 x 64 tokens
    python bench/bench_ddp_step.py --hidden 512 --depth 4 --grad-accum 2 --json bench/results/ddp_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_inputs(root: Path, grid: int, samples: int) -> tuple[Path, Path]:
    """A tiny-vqgan tokenizer checkpoint and token shards of random codes on a grid x grid layout."""
    from vqtok.data.token_shards import TokenShardWriter, file_sha256, token_dtype, write_json_atomic
    from vqtok.tokenizer.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer("tiny-vqgan")
    tokenizer.save(root / "tokenizer")
    identity = tokenizer.identity()
    out = root / "tokens"
    out.mkdir(parents=True)
    dtype = token_dtype(identity["vocab_size"])
    codes = np.random.default_rng(0).integers(0, identity["vocab_size"], (samples, 1, grid * grid))
    writer = TokenShardWriter(out, 0, "wds", dtype, 1, grid * grid)
    for i in range(samples):
        writer.write(f"img{i:05d}", codes[i].astype(dtype), i % 10)
    writer.close()
    shard = {"name": "tokens-000000.tar", "count": samples}
    shard["sha256"] = file_sha256(out / shard["name"])
    tok = {"preset": identity.get("preset"), "hash": identity.get("hash"), "vocab_size": identity["vocab_size"],
           "scales": [[grid, grid]], "tokens_per_view": grid * grid}
    write_json_atomic(out / "manifest.json", {
        "format": "wds", "version": 1, "dtype": dtype.name, "tokenizer": tok, "views": ["view0"],
        "classes": [f"class{i}" for i in range(10)], "num_samples": samples, "num_skipped": 0, "shards": [shard]})
    return root / "tokenizer", out


def build_task(args, env, tokens: Path, tokenizer: Path, grad_sync: str, batch: int):
    from vqtok.train.ar_task import ARTrainTask, load_run_config

    overrides = ["epochs=null", "train.steps=1000000", f"train.batch_size={batch}", f"train.grad_accum={args.grad_accum}",
                 "train.num_workers=0", "train.ema=false", "train.compile=false", "optim.warmup_steps=0",
                 f"model.hidden_size={args.hidden}", f"model.depth={args.depth}", f"model.num_heads={args.heads}",
                 f"model.intermediate_size={4 * args.hidden}", "model.dropout=0.0", "model.attn_dropout=0.0",
                 "anneal.unit=steps", "anneal.start=0", "anneal.end=1000000"]
    cfg = load_run_config("rar-tiny", overrides)
    task = ARTrainTask(cfg, env, tokens, tokenizer)
    task.grad_sync = grad_sync
    return cfg, task


def worker(args) -> None:
    import torch.distributed as dist

    from vqtok.distributed import DistEnv, init_distributed
    from vqtok.train.engine import Engine

    torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    # "local": each rank trains its share alone (a one-process engine, no gradient exchange), at the same
    # time as the other rank: the compute part of a step under the same contention
    modes = ("ddp", "explicit", "local")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            own = DistEnv(device=env.device) if mode == "local" else env
            batch = args.batch // env.world if mode == "local" else args.batch
            cfg, task = build_task(args, own, Path(args.inputs) / "tokens", Path(args.inputs) / "tokenizer",
                                   "explicit" if mode == "local" else mode, batch)
            engine = Engine(cfg.train, own, Path(tmp) / mode)
            engine.prepare(task)
            batch = next(task.batches(0))
            runs[mode] = {"engine": engine, "task": task, "batch": batch, "step": 0}
        params = sum(p.numel() for p in runs["ddp"]["task"].model.parameters())

        def step(mode: str) -> float:
            run = runs[mode]
            dist.barrier()
            t = time.perf_counter()
            run["engine"].train_step(run["task"], run["batch"], run["step"])
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            elapsed = time.perf_counter() - t
            run["step"] += 1
            slowest = torch.tensor([elapsed], dtype=torch.float64, device=env.device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            return float(slowest)

        for mode in modes:
            for _ in range(args.warmup):
                step(mode)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for block in range(args.blocks):
            order = modes if block % 2 == 0 else modes[::-1]
            for mode in order:
                for _ in range(args.steps):
                    times[mode].append(step(mode))
        a, b = (runs[m]["task"].model.state_dict() for m in ("ddp", "explicit"))
        max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    if env.is_main:
        report(args, env, params, times, max_diff)
    dist.destroy_process_group()


def report(args, env, params: int, times: dict[str, list[float]], max_diff: float) -> None:
    load = os.getloadavg()
    rows = {}
    for mode, ts in times.items():
        rows[mode] = {"median_s": statistics.median(ts), "min_s": min(ts), "steps": len(ts), "times_s": ts}
    ratio = rows["explicit"]["median_s"] / rows["ddp"]["median_s"]
    print(f"machine: {platform.machine()} {platform.processor()}, torch {torch.__version__}, device {env.device.type}, "
          f"{env.world} processes x {args.threads} threads, load average now {load[0]:.2f}")
    print(f"RAR hidden {args.hidden} x depth {args.depth} ({params / 1e6:.1f}M parameters, {4 * params / 2**20:.0f} MiB of fp32 "
          f"gradients), global batch {args.batch} x {args.grid * args.grid} tokens, grad_accum {args.grad_accum}, "
          f"{args.blocks} alternating blocks of {args.steps} steps after {args.warmup} warm-up steps per path")
    local = rows["local"]["median_s"]
    print("| path | median step | min step | median - no exchange | steps |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        label = {"ddp": "DDP (all-reduce overlapped with backward)", "explicit": "explicit (bucketed all-reduce after backward)",
                 "local": "no exchange (each rank its share alone: the compute part)"}[mode]
        r["over_local_s"] = r["median_s"] - local
        extra = f"{r['over_local_s'] * 1e3:+.1f} ms" if mode != "local" else "-"
        print(f"| {label} | {r['median_s'] * 1e3:.1f} ms | {r['min_s'] * 1e3:.1f} ms | {extra} | {r['steps']} |")
    print(f"explicit / DDP median: {ratio:.3f}x; max weight difference between the paths after training: {max_diff:.2e}")
    if args.json:
        out = {"machine": platform.machine(), "torch": torch.__version__, "device": env.device.type, "world": env.world,
               "threads": args.threads, "load_average_end": load[0], "parameters": params, "hidden": args.hidden,
               "depth": args.depth, "batch": args.batch, "tokens_per_sample": args.grid * args.grid,
               "grad_accum": args.grad_accum, "paths": rows, "explicit_over_ddp": ratio, "max_weight_diff": max_diff,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--grid", type=int, default=8, help="tokens per sample = grid x grid")
    ap.add_argument("--batch", type=int, default=16, help="global batch (both ranks, all micro-batches)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks (each path runs in every block)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--inputs", default=None, help=argparse.SUPPRESS)  # set by the launcher for its workers
    args = ap.parse_args()
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(Path(tmp), args.grid, max(args.batch, 32))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, *sys.argv[1:], "--inputs", tmp]
        sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
