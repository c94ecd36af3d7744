"""Tokenizer throughput: encode and decode images/s of the official-architecture presets at 256 px.

    python bench/bench_tokenizer.py                                   # maskgit b1/4/10, var + llamagen b4
    python bench/bench_tokenizer.py --threads 1 2 --repeats 3         # one table per thread count
    python bench/bench_tokenizer.py --ablate --presets maskgit-vqgan-f16 --batches 4
    python bench/bench_tokenizer.py --keep-freed-memory --variants shipped original   # glibc reuses freed blocks
    python bench/bench_tokenizer.py --device cuda                     # bf16 autocast + channels_last

Weights are random (speed does not depend on them). CPU runs are fp32 under `torch.inference_mode()`.
Each cell is the best of `--repeats` runs; variants and presets are interleaved within every repeat so
they see the same machine load. Two rates are printed: images per wall-clock second, and images per
CPU-second of this process (`time.process_time`), which is the steadier of the two when other jobs share
the cores. The 1-minute load average is printed on every row.

`--ablate` times the shipped code next to versions with one speed-up switched off (patched in this
process only), so the README can say what each one buys:
    nchw             the autoencoder runs in the caller's NCHW layout instead of channels-last
    out-of-place     SiLU and residual adds allocate fresh tensors even without autograd
    direct-upsample  nearest x2 upsampling materialised, then the 3x3 conv
    original         all three off (the code before the speed work)
Every variant must produce the same tokens as the shipped code; the bench checks that.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import subprocess
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from timing import sync
from vqtok.device import autocast, pick_device
from vqtok.errors import UserError
from vqtok.tokenizer import autoencoder, blocks
from vqtok.tokenizer.tokenizer import build_tokenizer

DEFAULT_PLAN = {"maskgit-vqgan-f16": [1, 4, 10], "var-msvq-f16": [4], "llamagen-vq-f16": [4]}
VARIANTS = ("shipped", "nchw", "out-of-place", "direct-upsample", "original")


# ------------------------------------------------------------------ switches for the ablation


def _direct_upsample(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@contextmanager
def variant(name: str):
    """Patch the autoencoder modules so that `name`'s speed-ups are off; restore them afterwards."""
    saved = (autoencoder._to_internal_layout, blocks.in_place_ok, blocks.upsample2x_conv3x3,
             autoencoder.upsample2x_conv3x3)
    off = {"nchw": {"layout"}, "out-of-place": {"inplace"}, "direct-upsample": {"upsample"},
           "original": {"layout", "inplace", "upsample"}}.get(name, set())
    try:
        if "layout" in off:
            autoencoder._to_internal_layout = lambda x, image_pixels: x
        if "inplace" in off:
            blocks.in_place_ok = lambda: False
        if "upsample" in off:
            blocks.upsample2x_conv3x3 = autoencoder.upsample2x_conv3x3 = _direct_upsample
        yield
    finally:
        (autoencoder._to_internal_layout, blocks.in_place_ok, blocks.upsample2x_conv3x3,
         autoencoder.upsample2x_conv3x3) = saved


def keep_freed_memory() -> None:
    """Ask glibc malloc to serve big tensors from its heap and keep freed memory for reuse.

    By default every allocation above 32 MB (one 128 x 256 x 256 fp32 activation) is a fresh mmap that
    the kernel zero-fills page by page, then munmapped on free: ~15 ms per such tensor here. Raising
    the mmap and trim thresholds makes later tensors reuse already-mapped pages. Process-wide, so only
    on request; `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647` in the
    environment does the same for any command.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("mallopt refused the thresholds (not glibc?)")


# ------------------------------------------------------------------ timing


def timed(fn, device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - w, time.process_time() - c, out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def prepare(preset: str, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    tok = build_tokenizer(preset).eval().to(device)
    if channels_last:
        tok = tok.to(memory_format=torch.channels_last)
    return tok


def bench_threads(args, device: torch.device, threads: int) -> None:
    if device.type == "cpu":
        torch.set_num_threads(threads)
    on_cuda = device.type == "cuda"
    variants = VARIANTS if args.ablate else (args.variants or ["shipped"])
    plan = {p: (args.batches or DEFAULT_PLAN.get(p, [4])) for p in args.presets}
    models = {p: prepare(p, device, channels_last=on_cuda) for p in plan}
    cases = [(p, b) for p, bs in plan.items() for b in bs]
    gen = torch.Generator().manual_seed(0)
    images = {}
    for p, b in cases:
        x = torch.rand(b, 3, args.size, args.size, generator=gen).to(device)
        images[(p, b)] = x.contiguous(memory_format=torch.channels_last) if on_cuda else x
    best: dict[tuple, list[float]] = {}
    loads: dict[tuple, float] = {}
    reference_tokens: dict[tuple, torch.Tensor] = {}
    with torch.inference_mode(), autocast(device, enabled=on_cuda and not args.fp32):
        for p in plan:  # one-time setup (library init, primitive caches) outside the timed runs
            models[p].decode(models[p].encode(images[(p, plan[p][0])][:1]))
            sync(device)
        for rep in range(args.repeats):
            for p, b in cases:
                tok, x = models[p], images[(p, b)]
                for v in variants:
                    with variant(v):
                        te_w, te_c, idx = timed(lambda: tok.encode(x), device)
                        if (p, b) not in reference_tokens:
                            reference_tokens[(p, b)] = idx
                        td_w, td_c, _ = timed(lambda: tok.decode(reference_tokens[(p, b)]), device)
                    if not torch.equal(idx, reference_tokens[(p, b)]):
                        raise SystemExit(f"{p} batch {b}: variant {v} changed the tokens")
                    key = (p, b, v)
                    cell = best.setdefault(key, [float("inf")] * 4)
                    for i, t in enumerate((te_w, te_c, td_w, td_c)):
                        cell[i] = min(cell[i], t)
                    loads[key] = os.getloadavg()[0]
                    if args.verbose:
                        print(f"  rep {rep} {p} b{b} {v}: enc {te_w:.2f}s dec {td_w:.2f}s", flush=True)
    dtype = "bf16 autocast" if on_cuda and not args.fp32 else "fp32"
    layout = "channels_last (model + input)" if on_cuda else "as shipped"
    print(f"\n{uptime()}")
    print(f"device {device} ({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
          f"torch {torch.__version__}, {dtype}, threads {torch.get_num_threads()}, layout {layout}, "
          f"malloc {'keeps freed memory' if args.keep_freed_memory else 'default'}, best of {args.repeats}")
    print("| preset | batch | variant | encode img/s | encode img/CPU-s | decode img/s | decode img/CPU-s "
          "| load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for (p, b, v), (ew, ec, dw, dc) in best.items():
        cpu_e = f"{b / ec:.3f}" if device.type == "cpu" else "-"
        cpu_d = f"{b / dc:.3f}" if device.type == "cpu" else "-"
        print(f"| {p} | {b} | {v} | {b / ew:.3f} | {cpu_e} | {b / dw:.3f} | {cpu_d} | {loads[(p, b, v)]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PLAN))
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="batch sizes for every preset (default: maskgit 1 4 10, the others 4)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", nargs="+", type=int, default=None,
                    help="torch threads; one table each (default: the cores this process may use)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp32", action="store_true", help="on CUDA, run without bf16 autocast")
    ap.add_argument("--ablate", action="store_true", help="also time each speed-up switched off")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="time only these variants")
    ap.add_argument("--keep-freed-memory", action="store_true", help="glibc mallopt: reuse freed big blocks")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    try:
        device = pick_device(args.device)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.keep_freed_memory:
        keep_freed_memory()
    print(f"bench_tokenizer {datetime.date.today()}  {platform.node()}  cores {len(os.sched_getaffinity(0))}")
    print(uptime())
    for n in args.threads or [len(os.sched_getaffinity(0))]:
        bench_threads(args, device, n)


if __name__ == "__main__":
    main()
