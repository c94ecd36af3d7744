"""RAR sampling speed: KV-cached vs full recomputation, and the one-token forward floor (tokens only).

    python bench/bench_rar_sampling.py                      # hidden 256, depth 8, 8 heads, batch 16, CFG
    python bench/bench_rar_sampling.py --no-uncached        # skip the slow reference sampler
    python bench/bench_rar_sampling.py --preset rar-b --batch 32

Reports seconds per batch (256 steps, classifier-free guidance, so 2x batch rows per step), images/s,
the mean decode step, and the floor: one `decode_step` of a single token at the same batch against a
half-full cache. Results go in bench/README.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from vqtok.ar.presets import get_preset
from vqtok.ar.rar import RAR, RARConfig
from vqtok.ar.sampling import SamplingConfig, sample


def build(args) -> RAR:
    if args.preset:
        cfg = get_preset(args.preset)
    else:
        cfg = RARConfig(hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                        intermediate_size=4 * args.hidden)
    model = RAR(cfg)
    with torch.no_grad():  # random non-zero modulation so no block is a cheap identity
        for block in model.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.02)
    return model.to(args.device).eval()


def time_sample(model, classes, cfg, kv_cache, seed=0) -> float:
    gen = torch.Generator(device=classes.device).manual_seed(seed)
    if classes.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sample(model, classes, cfg, generator=gen, kv_cache=kv_cache)
    if classes.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def one_token_floor(model: RAR, rows: int, device, repeats: int = 20) -> float:
    """Mean time of one decode step (single new token per row) at a half-full cache."""
    N = model.config.seq_len
    cond = model.condition_ids(torch.zeros(rows, dtype=torch.long, device=device))
    orders = torch.arange(N, device=device).expand(rows, N)
    cache = model.new_cache(rows, device=device)
    model.prefill(cond, orders, cache)
    token = torch.zeros(rows, dtype=torch.long, device=device)
    for step in range(1, N // 2):
        model.decode_step(token, step, orders, cache)
    times = []
    for _ in range(repeats):
        cache.length = 1 + N // 2
        t0 = time.perf_counter()
        model.decode_step(token, N // 2, orders, cache)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--no-uncached", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args)
    device = torch.device(args.device)
    classes = torch.arange(args.batch, device=device) % model.config.num_classes
    cfg = SamplingConfig(guidance_scale=args.cfg, guidance_schedule="power-cosine", guidance_power=2.75)
    n_params = model.num_parameters()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print(f"model: hidden {model.config.hidden_size}, depth {model.config.depth}, heads {model.config.num_heads}, "
          f"{n_params / 1e6:.1f}M params; batch {args.batch}, {model.config.seq_len} tokens, CFG {args.cfg} (2x rows)")

    time_sample(model, classes[:2], cfg, True)  # warm-up
    cached = min(time_sample(model, classes, cfg, True, seed=s) for s in range(2))
    steps = model.config.seq_len
    floor = one_token_floor(model, 2 * args.batch, device)
    print(f"kv-cached: {cached:.2f} s/batch, {args.batch / cached:.2f} img/s, {cached / steps * 1e3:.1f} ms/step")
    print(f"one-token forward floor: {floor * 1e3:.1f} ms/step -> mean step / floor = {cached / steps / floor:.2f}")
    if not args.no_uncached:
        full = time_sample(model, classes, cfg, False)
        print(f"full recomputation: {full:.2f} s/batch -> kv cache speed-up {full / cached:.1f}x")


if __name__ == "__main__":
    main()
