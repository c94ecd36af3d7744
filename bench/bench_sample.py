"""`vqtok sample` speed: the sampling benchmarks (results in bench/README.md).

    python bench/bench_sample.py --threads 1                    # the CPU cases below
    python bench/bench_sample.py --case small --uncached full   # run the full-recomputation sampler end to end
    python bench/bench_sample.py --case cuda                    # GPU only: rar-b batch 128, fp32 and bf16

Cases (random-init weights, 256 tokens, CFG power-cosine 4.0 / pow 2.75, so every step runs 2 x batch rows):
- small: a hidden 256 / depth 8 / 8 heads model (11.1M parameters), batch 16, tokens only:
  * the `vqtok sample` loop (vqtok.app.sample.sample_tokens, per-sample noise) and the RAR sampler
    (vqtok.ar.sampling.sample) it mirrors;
  * the sampler without KV cache (full recomputation of the prefix each step). `--uncached estimate` (the
    default) times the full-prefix forward at 9 prefix lengths and integrates over the 256 steps, because
    the full run takes many minutes on a shared CPU; `--uncached full` runs it;
  * the floor: one `decode_step` (one new token per row) against a half-full cache at the same batch.
- rar-b: rar-b (261M) at batch 32 with CFG plus decoding to pixels with maskgit-vqgan-f16 (54.5M). On a CPU a
  full batch takes tens of minutes, so by default it is estimated: the decode step timed at 5 cache lengths
  and integrated over 256 steps, plus the tokenizer decode timed on `--decode-images` images and scaled to
  32. `--rar-b-full` runs the real thing through `sample_tokens` + `Tokenizer.decode`.
- cuda (only when CUDA is present): rar-b at batch 128 including pixel decoding, fp32 (TF32 off) and bf16
  autocast, eager and with one CUDA graph per decode step (the KV cache is allocated once, so every step
  has static shapes and addresses; the graphs share one memory pool and replay in capture order).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from timing import sync
from vqtok.app.sample import sample_noise, sample_tokens
from vqtok.ar.presets import get_preset
from vqtok.ar.rar import RAR, RARConfig
from vqtok.ar.sampling import SamplingConfig, sample

CFG = SamplingConfig(guidance_scale=4.0, guidance_schedule="power-cosine", guidance_power=2.75)


def build(cfg: RARConfig, device) -> RAR:
    model = RAR(cfg)
    with torch.no_grad():  # non-zero modulation so no block is a cheap identity
        for block in model.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.02)
    return model.to(device).eval()


CPU_SECONDS: list[float] = []  # this process's CPU time of each `timed` call, in order


def timed(fn, device) -> float:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    CPU_SECONDS.append(time.process_time() - c0)
    return time.perf_counter() - t0


def timed_cpu(fn, device) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    wall = timed(fn, device)
    return wall, CPU_SECONDS[-1]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@torch.no_grad()
def step_time(model: RAR, rows: int, cache_len: int, device, repeats: int = 5, cpu: bool = False):
    """Median time of one decode_step (one new token per row) with `cache_len` slots already filled
    (with `cpu`: (median wall, median CPU) seconds)."""
    N = model.config.seq_len
    cond = model.condition_ids(torch.zeros(rows, dtype=torch.long, device=device))
    orders = torch.arange(N, device=device).expand(rows, N)
    cache = model.new_cache(rows, device=device)
    model.prefill(cond, orders, cache)
    token = torch.zeros(rows, dtype=torch.long, device=device)
    step = cache_len - 1  # decode_step(step) feeds slot step+1, so cache_len slots are filled after it
    times, cpus = [], []
    for _ in range(repeats + 1):
        cache.length = cache_len - 1
        times.append(timed(lambda: model.decode_step(token, step, orders, cache), device))
        cpus.append(CPU_SECONDS[-1])
    return (median(times[1:]), median(cpus[1:])) if cpu else median(times[1:])


@torch.no_grad()
def full_prefix_time(model: RAR, rows: int, t: int, device) -> float:
    """One step of the uncached sampler: the forward over [cls, cond, t tokens]."""
    N = model.config.seq_len
    cond = model.condition_ids(torch.zeros(rows, dtype=torch.long, device=device))
    orders = torch.arange(N, device=device).expand(rows, N)
    tokens = torch.zeros(rows, t, dtype=torch.long, device=device)
    return timed(lambda: model.prefix_logits(tokens, cond, orders), device)  # one run: long prefixes take seconds


def integrate(points: dict[int, float], steps: int) -> float:
    """Total over steps 0..steps-1 from times at a few step indices (piecewise linear)."""
    xs = sorted(points)
    return float(np.interp(np.arange(steps), xs, [points[x] for x in xs]).sum())


def case_small(args) -> None:
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build(RARConfig(hidden_size=256, depth=8, num_heads=8, intermediate_size=1024), device)
    B, N = args.batch, model.config.seq_len
    classes = torch.arange(B) % model.config.num_classes
    print(f"small: hidden 256, depth 8, heads 8, {model.num_parameters() / 1e6:.1f}M params; batch {B}, {N} tokens, CFG (2x rows)")
    noise = sample_noise(0, range(B), N)
    sample_tokens(model, classes[:2], CFG, noise[:2])  # warm-up
    gen = torch.Generator().manual_seed(0)
    # the floor before and after the sampling runs, the two samplers alternating in between, so load
    # changes during the case reach both sides of the ratio alike
    floors = [step_time(model, 2 * B, N // 2 + 2, device, repeats=9, cpu=True)]
    loop_runs, rar_runs = [], []
    for r in range(args.repeats):
        runs = [(loop_runs, lambda: sample_tokens(model, classes, CFG, noise)), (rar_runs, lambda: sample(model, classes, CFG, generator=gen))]
        for out, fn in (runs if r % 2 == 0 else runs[::-1]):
            out.append(timed_cpu(fn, device))
    floors.append(step_time(model, 2 * B, N // 2 + 2, device, repeats=9, cpu=True))
    ours, ours_cpu = min(w for w, _ in loop_runs), min(c for _, c in loop_runs)
    rar, rar_cpu = min(w for w, _ in rar_runs), min(c for _, c in rar_runs)
    print(f"  vqtok sample loop (generate.sample_tokens): {ours:.2f} s/batch, {B / ours:.2f} img/s, {ours / N * 1e3:.1f} ms/step "
          f"(CPU {ours_cpu:.2f} s)")
    print(f"  RAR sampler (sampling.sample, kv cache):   {rar:.2f} s/batch, {B / rar:.2f} img/s (CPU {rar_cpu:.2f} s)")
    floor, floor_cpu = min(f for f, _ in floors), min(c for _, c in floors)
    cached, cached_cpu = min(ours, rar), min(ours_cpu, rar_cpu)
    print(f"  one-token forward floor at {2 * B} rows, half-full cache: {floor * 1e3:.1f} ms (before / after the runs: "
          f"{', '.join(f'{f * 1e3:.1f}' for f, _ in floors)}) -> mean step / floor = {cached / N / floor:.2f}")
    print(f"  the same in CPU time: floor {floor_cpu * 1e3:.1f} ms, vqtok sample loop step {ours_cpu / N * 1e3:.1f} ms "
          f"-> {ours_cpu / N / floor_cpu:.2f}; RAR sampler step {rar_cpu / N * 1e3:.1f} ms -> {rar_cpu / N / floor_cpu:.2f}")
    if args.uncached == "full":
        full = timed(lambda: sample(model, classes, CFG, generator=gen, kv_cache=False), device)
        print(f"  without kv cache (full run): {full:.1f} s/batch -> cached is {full / cached:.1f}x faster")
    elif args.uncached == "estimate":
        points = {t: full_prefix_time(model, 2 * B, t, device) for t in (0, 32, 64, 96, 128, 160, 192, 224, 255)}
        full = integrate(points, N)
        print(f"  without kv cache (estimated from 9 prefix lengths): {full:.1f} s/batch -> cached is {full / cached:.1f}x faster")


def case_rar_b(args) -> None:
    from vqtok.tokenizer.tokenizer import build_tokenizer

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build(get_preset("rar-b"), device)
    tok = build_tokenizer("maskgit-vqgan-f16").eval()
    B, N = 32, model.config.seq_len
    print(f"rar-b: {model.num_parameters() / 1e6:.1f}M params, batch {B}, CFG (2x rows); decoder maskgit-vqgan-f16 "
          f"{sum(p.numel() for p in tok.parameters()) / 1e6:.1f}M params, 256 px")
    if args.rar_b_full:
        classes = torch.arange(B)
        total = timed(lambda: tok.decode(sample_tokens(model, classes, CFG, sample_noise(0, range(B), N))), device)
        print(f"  full batch incl. decoding: {total:.1f} s, {B / total:.3f} img/s")
        return
    points = {t: step_time(model, 2 * B, t + 2, device, repeats=2) for t in (0, 64, 128, 192, 254)}
    gen_time = integrate(points, N)
    n = args.decode_images
    tokens = torch.randint(0, tok.vocab_size, (n, N))
    tok.decode(tokens[:1])
    dec = timed(lambda: tok.decode(tokens), device) / n * B
    total = gen_time + dec
    print(f"  decode step at cache 2/66/130/194/256: {', '.join(f'{v * 1e3:.0f}' for v in points.values())} ms")
    print(f"  estimated: generation {gen_time:.0f} s + pixel decoding {dec:.0f} s ({n} images timed) = {total:.0f} s/batch, "
          f"{B / total:.3f} img/s")


# --------------------------------------------------------------------------------------------- CUDA


def graphed_sampler(model: RAR, batch: int, autocast_dtype):
    """`vqtok sample --cuda-graphs on`'s decoder (vqtok.ar.cuda_graphs), through bench/gpu_suite.py's wrapper.

    An earlier class here refilled its condition buffer in place while the KV cache memoised the adaLN
    condition groups on that buffer's identity, so every graphed batch was modulated with the warm-up's
    classes; the product's static decoder groups the conditions explicitly at prefill instead.
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_suite import GraphedSampler

    return GraphedSampler(model, batch, CFG, graphs=True, autocast_dtype=autocast_dtype)


def case_cuda(args) -> None:
    if not torch.cuda.is_available():
        print("cuda: skipped, no CUDA device")
        return
    from vqtok.tokenizer.tokenizer import build_tokenizer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the paper's fp32 baseline
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build(get_preset("rar-b"), device)
    tok = build_tokenizer("maskgit-vqgan-f16").to(device).eval()
    B, N = args.cuda_batch, model.config.seq_len
    classes = torch.arange(B, device=device) % 1000
    noise = sample_noise(0, range(B), N)
    print(f"cuda: {torch.cuda.get_device_name()}, rar-b batch {B}, CFG, incl. maskgit-vqgan-f16 decoding")
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def eager():
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                tokens = sample_tokens(model, classes, CFG, noise)
            tok.decode(tokens)

        eager()
        t_eager = timed(eager, device)
        t0 = time.perf_counter()
        graphed = graphed_sampler(model, B, dtype)
        capture = time.perf_counter() - t0
        run = lambda: tok.decode(graphed.sample(classes, noise))
        run()
        t_graph = min(timed(run, device) for _ in range(2))
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            same = torch.equal(graphed.sample(classes, noise), sample_tokens(model, classes, CFG, noise))
        print(f"  {name}: eager {B / t_eager:.1f} img/s ({t_eager:.2f} s); CUDA graphs {B / t_graph:.1f} img/s "
              f"({t_graph:.2f} s, capture {capture:.1f} s, tokens equal eager: {same})")
        del graphed
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("small", "rar-b", "cuda", "all"), default="all")
    p.add_argument("--batch", type=int, default=16, help="small case batch")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--uncached", choices=("estimate", "full", "skip"), default="estimate")
    p.add_argument("--rar-b-full", action="store_true")
    p.add_argument("--decode-images", type=int, default=2)
    p.add_argument("--cuda-batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.case in ("small", "all"):
        case_small(args)
    if args.case in ("rar-b", "all"):
        case_rar_b(args)
    if args.case in ("cuda", "all"):
        case_cuda(args)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
