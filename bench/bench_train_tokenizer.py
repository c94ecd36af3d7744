"""Tokenizer training throughput: real `train-tokenizer` Engine steps, timed whole.

    python bench/bench_train_tokenizer.py --recipe tiny-vqgan --batch 8 --steps 5
    python bench/bench_train_tokenizer.py --recipe vqgan-f16 --batch 1 --steps 2 --threads 1
    python bench/bench_train_tokenizer.py --recipe vqgan-f16 --device cuda --batch 16 --steps 10   # bf16 autocast
    python bench/bench_train_tokenizer.py --recipe tiny-vqgan --batch 8 --steps 12 --ab train.channels_last=false,true

Each timed step is `Engine.train_step` on the recipe's `TokenizerTrainTask`: the generator phase (tokenizer
forward, every loss term the recipe switches on - reconstruction, LPIPS when perceptual_weight > 0,
quantizer, the adversarial term with its adaptive weight - backward, gradient clipping, Adam, EMA) and the
discriminator phase when the recipe's discriminator is active. The discriminator is switched on from step 0
(`loss.disc_start=0`) so every timed step has both phases, as in the bulk of a run. Data loading is not in
the timing: the same batch of random images (already on the device) is fed each step. LPIPS, where the
recipe uses it, runs the random VGG16 trunk unless --lpips PATH (same cost as the real one).

`--ab KEY=A,B` times two engines in one process, one per value of the config key, alternating their steps
(A B, then B A, ...) so that both see the same machine load, and reports each side's median and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timing import time_calls
from vqtok.device import pick_device
from vqtok.distributed import DistEnv
from vqtok.train.engine import Engine
from vqtok.train.tokenizer_task import TokenizerTrainTask, load_run_config


def build_engine_step(recipe: str, batch: int, device: torch.device, overrides: list[str] = (),
                      lpips: str = "random-for-tests", resolution: int | None = None):
    """(step(), task, config): step() runs one real engine step (both phases) on a fixed device batch."""
    ov = [f"train.batch_size={batch}", "train.num_workers=0", "loss.disc_start=0", "data.preview_images=0",
          "train.steps=1000000"]
    if resolution:
        ov.append(f"data.resolution={resolution}")
    cfg = load_run_config(recipe, ov + list(overrides), lpips_weights=lpips)
    env = DistEnv(device=device)
    with tempfile.TemporaryDirectory() as tmp:  # the task lists a data folder; the timed steps never read it
        data = Path(tmp) / "images"
        data.mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "0.png")
        task = TokenizerTrainTask(cfg, env, data, Path(tmp) / "run")
        engine = Engine(cfg.train, env, Path(tmp) / "run")
    engine.prepare(task)  # EMAs as a run keeps them
    res = cfg.data.resolution
    images = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device)
    counter = {"step": 0}

    def step() -> dict[str, float]:
        metrics = engine.train_step(task, {"images": images}, counter["step"]).floats()
        counter["step"] += 1
        return metrics

    return step, task, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny-vqgan")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median and minimum reported)")
    ap.add_argument("--resolution", type=int, default=None, help="override data.resolution")
    ap.add_argument("--lpips", default="random-for-tests")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--ab", default=None, metavar="KEY=A,B",
                    help="compare two values of one config key, steps alternating (e.g. train.channels_last=false,true)")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load0 = os.getloadavg()[0]
    if args.ab:
        return compare_ab(args, device, load0)
    step, task, cfg = build_engine_step(args.recipe, args.batch, device, args.overrides, args.lpips, args.resolution)
    cpu: list[float] = []

    def timed_step():
        t = time.process_time()
        step()
        cpu.append(time.process_time() - t)

    times = time_calls(timed_step, device, args.steps)
    cpu = cpu[-len(times):]  # the timed calls, not the warm-up
    med, best = statistics.median(times), min(times)
    params = sum(p.numel() for p in task.tokenizer.parameters()) / 1e6
    phases = [p.name for p in task.phases()]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"recipe={args.recipe} res={cfg.data.resolution} batch={args.batch} tokenizer={params:.1f}M params "
          f"phases={'+'.join(phases)} perceptual_weight={cfg.loss.perceptual_weight} amp={cfg.train.amp and device.type == 'cuda'}")
    print(f"engine step: median {med * 1e3:.1f} ms, min {best * 1e3:.1f} ms over {len(times)} steps -> "
          f"{args.batch / med:.2f} img/s (best {args.batch / best:.2f})")
    # this process's CPU seconds per step: on a shared machine steadier than wall time (1 thread: the same work)
    print(f"engine step CPU time: median {statistics.median(cpu) * 1e3:.1f} ms, min {min(cpu) * 1e3:.1f} ms")


def compare_ab(args, device: torch.device, load0: float) -> None:
    key, sep, values = args.ab.partition("=")
    sides = values.split(",")
    if not sep or len(sides) != 2 or not all(sides):
        raise SystemExit(f"--ab wants KEY=A,B (two values), got {args.ab!r}")
    steps = {v: build_engine_step(args.recipe, args.batch, device, [*args.overrides, f"{key}={v}"], args.lpips,
                                  args.resolution)[0] for v in sides}
    for fn in steps.values():  # warm-up: first-call allocations and oneDNN primitive creation
        fn()
        fn()
    times: dict[str, list[float]] = {v: [] for v in sides}
    for i in range(args.steps):
        for v in (sides if i % 2 == 0 else sides[::-1]):
            times[v] += time_calls(steps[v], device, 1, warmup=0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    med = {v: statistics.median(t) for v, t in times.items()}
    for v in sides:
        print(f"{key}={v}: engine step median {med[v] * 1e3:.1f} ms, min {min(times[v]) * 1e3:.1f} ms "
              f"over {len(times[v])} steps (recipe={args.recipe} batch={args.batch})")
    print(f"ratio {key}={sides[0]} / {key}={sides[1]} (medians): {med[sides[0]] / med[sides[1]]:.2f}x")


if __name__ == "__main__":
    main()
