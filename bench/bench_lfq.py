"""LFQ with 2^18 codes and its entropy loss: forward + backward time and peak memory, vqtok vs
vector-quantize-pytorch (a bench-only dependency: `pip install vector-quantize-pytorch`).

Each case runs in a fresh subprocess so `ru_maxrss` (peak resident memory) belongs to that case alone;
the table shows the peak and the peak above the process's footprint just before the measured step.

    python bench/bench_lfq.py                        # vqtok at 512, 2048, 16384 tokens; reference at 512
    python bench/bench_lfq.py --ref-tokens 512 2048  # also the reference at 2048 (about 14 GiB, ~1 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

BITS = 18


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(impl: str, tokens: int, repeats: int) -> dict:
    import torch

    import_mib = peak_rss_mib()  # the torch runtime alone, the same for both implementations

    torch.manual_seed(0)
    if impl == "vqtok":
        from vqtok.tokenizer.quantizers.lfq import LFQ

        q = LFQ(codebook_size=2**BITS, entropy_weight=0.1, commitment_weight=0.25, diversity_gamma=1.0)

        def step(z):
            z_q, _, aux = q(z)
            (z_q.square().mean() + aux["loss"]).backward()
    else:
        from vector_quantize_pytorch import LFQ as RefLFQ

        q = RefLFQ(codebook_size=2**BITS, dim=BITS, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                   diversity_gamma=1.0)

        def step(z):
            z_q, _, aux_loss = q(z)
            (z_q.square().mean() + aux_loss).backward()
    q.train()

    def make(n):  # n tokens as images of 16x16 latents (n < 256: one n x 1 map)
        shape = (n // 256, BITS, 16, 16) if n >= 256 else (1, BITS, n, 1)
        return torch.randn(shape, requires_grad=True)

    step(make(64))  # warm-up: allocator and kernels, far below the measured size
    z = make(tokens)
    base = rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(z)
        times.append(time.perf_counter() - t0)
        z.grad = None
    return {"impl": impl, "tokens": tokens, "threads": torch.get_num_threads(), "torch": torch.__version__, "time_s": min(times), "repeats": repeats,
            "peak_mib": peak_rss_mib(), "peak_above_base_mib": peak_rss_mib() - base,
            "torch_import_mib": import_mib}


def spawn(impl: str, tokens: int, repeats: int) -> dict | None:
    cmd = [sys.executable, __file__, "--case", impl, str(tokens), str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"{impl} at {tokens} tokens failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 16384])
    ap.add_argument("--ref-tokens", type=int, nargs="*", default=[512],
                    help="token counts for vector-quantize-pytorch (2048 needs ~14 GiB and about a minute)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", nargs=3, metavar=("IMPL", "TOKENS", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return

    # The parent imports neither torch nor the reference: Linux carries ru_maxrss across fork + exec,
    # so anything loaded here would show up as the children's peak.
    have_ref = importlib.util.find_spec("vector_quantize_pytorch") is not None
    if not have_ref:
        print("note: vector-quantize-pytorch is not installed; its column is skipped", file=sys.stderr)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print("peak = whole-process peak RSS; above base = peak minus RSS just before the measured step")
    print("| tokens | vqtok time (s) | vqtok peak / above base (MiB) | vq-pytorch time (s) | "
          "vq-pytorch peak / above base (MiB) | speed-up | memory ratio (above base) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.tokens:
        ours = spawn("vqtok", n, args.repeats)
        ref = spawn("reference", n, 1) if have_ref and n in args.ref_tokens else None
        row = [str(n)]
        row += [f"{ours['time_s']:.3f}", f"{ours['peak_mib']:.0f} / {ours['peak_above_base_mib']:.0f}"] if ours else ["-", "-"]
        if ref:
            row += [f"{ref['time_s']:.2f}", f"{ref['peak_mib']:.0f} / {ref['peak_above_base_mib']:.0f}"]
            if ours:
                row += [f"{ref['time_s'] / ours['time_s']:.0f}x",
                        f"1/{ref['peak_above_base_mib'] / max(ours['peak_above_base_mib'], 1):.0f}"]
            else:
                row += ["-", "-"]
        else:
            row += ["not run", "not run", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
        if ours:
            print(f"(torch {ours['torch']}, {ours['threads']} threads; importing torch alone: "
                  f"{ours['torch_import_mib']:.0f} MiB peak RSS)", file=sys.stderr)


if __name__ == "__main__":
    main()
