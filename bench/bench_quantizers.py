"""Throughput of every quantizer, forward + backward, in tokens per second.

    python bench/bench_quantizers.py [--batch 8] [--repeats 5] [--device cpu]

Configurations are the ones the presets use at 256 px (16 x 16 tokens per image). The loss is
sum(z_q^2) + aux["loss"], so the straight-through path and the quantizer's own losses both run backward.
"""

from __future__ import annotations

import argparse
import time

import torch

from vqtok.tokenizer.quantizers.fsq import FSQ
from vqtok.tokenizer.quantizers.lfq import LFQ
from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ
from vqtok.tokenizer.quantizers.vq import VectorQuantizer


def cases():
    yield "VQ maskgit (1024 x 256, L2)", lambda: VectorQuantizer(codebook_size=1024, dim=256, beta_on="codebook"), 256
    yield "VQ llamagen (16384 x 8, l2-norm)", lambda: VectorQuantizer(codebook_size=16384, dim=8, l2_norm=True), 8
    yield "VQ EMA + dead-code (16384 x 8)", lambda: VectorQuantizer(codebook_size=16384, dim=8, ema=True,
                                                                    dead_code_threshold=1.0), 8
    yield "FSQ [8,5,5,5] (1000 codes)", lambda: FSQ(levels=[8, 5, 5, 5]), 4
    yield "FSQ [8,8,8,5,5,5] proj 256", lambda: FSQ(levels=[8, 8, 8, 5, 5, 5], dim=256), 256
    yield "LFQ 2^18 + entropy", lambda: LFQ(codebook_size=2**18), 18
    yield "LFQ 2^10 + entropy", lambda: LFQ(codebook_size=2**10), 10
    yield "VAR multi-scale (4096 x 32, 10 scales)", lambda: MultiScaleResidualVQ(codebook_size=4096, dim=32), 32


def measure(make, dim, batch, repeats, device):
    q = make().to(device).train()
    z = torch.randn(batch, dim, 16, 16, device=device, requires_grad=True)

    def step():
        z_q, _, aux = q(z)
        (z_q.square().sum() + aux["loss"]).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch * 16 * 16 / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x 16 x 16 tokens, best of {args.repeats}")
    print("| quantizer | tokens/s (fwd+bwd) |")
    print("|---|---|")
    for name, make, dim in cases():
        print(f"| {name} | {measure(make, dim, args.batch, args.repeats, device):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
