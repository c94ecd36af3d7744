"""RAR training throughput: tokens/s and achieved matmul GFLOP/s next to the machine's fp32 GEMM rate.

One timed step is exactly what `train-ar` runs per optimizer step: random orders for the batch (r = 1,
vectorised), class ids with label dropout, forward, the official loss, backward, global-norm clipping
and AdamW with the no-decay groups. Achieved GFLOP/s = 6 x matmul parameters x tokens / step time,
where the matmul parameters are every Linear weight (qkv, proj, fc1, fc2, the per-token adaLN
Linear(D, 6D), the final adaLN and lm_head) and tokens = batch x image tokens (attention's own matmuls
are left out, as in the usual 6N rule). The GEMM reference is the best of a few fp32 square matmuls.

    python bench/bench_train_ar.py                    # batch 8, hidden 768 x 4 layers and hidden 256 x 8 layers
    python bench/bench_train_ar.py --steps 10 --depth-768 2 --threads 2
    python bench/bench_train_ar.py --device cuda --batch 64 --depth-768 24   # bf16 autocast, fused AdamW
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from timing import sync, time_calls
from vqtok.ar.orders import sample_orders
from vqtok.ar.rar import RAR, RARConfig, ar_loss
from vqtok.device import autocast
from vqtok.train.ar_task import weight_decay_groups
from vqtok.train.engine import OptimizerConfig, build_optimizer

H100_BF16_DENSE_TFLOPS = 989.0


def gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def matmul_params(model: RAR) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def bench_model(hidden: int, depth: int, heads: int, batch: int, steps: int, device: torch.device, dropout: float,
                compile: bool = False) -> dict:
    cfg = RARConfig(hidden_size=hidden, depth=depth, num_heads=heads, intermediate_size=4 * hidden,
                    dropout=dropout, attn_dropout=dropout, class_dropout=0.1)
    torch.manual_seed(0)
    model = RAR(cfg).to(device).train()
    ocfg = OptimizerConfig(kind="adamw", lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03, grad_clip=1.0)
    optimizer = build_optimizer(ocfg, weight_decay_groups(model, 0.03), device)
    target = torch.arange(cfg.seq_len, device=device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    classes = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def loss_fn(tokens, cond, orders):  # what ARTrainTask compiles with train.compile=true
        logits, labels = model.forward_conditions(tokens, cond, orders)
        return ar_loss(logits, labels)

    forward = torch.compile(loss_fn) if compile else loss_fn

    def step():
        orders = sample_orders(batch, target, 1.0, device=device)
        cond = model.condition_ids(classes, drop_prob=cfg.class_dropout)
        with autocast(device):
            loss, _ = forward(tokens, cond, orders)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    # warm-up: allocator, optimizer state, kernels (and compilation)
    times = sorted(time_calls(step, device, steps, warmup=3 if compile else 2))
    median = times[len(times) // 2]
    n_tok = batch * cfg.seq_len
    mm = matmul_params(model)
    out = {"hidden": hidden, "depth": depth, "heads": heads, "batch": batch, "params_M": model.num_parameters() / 1e6,
           "matmul_params_M": mm / 1e6, "step_s": median, "best_step_s": times[0], "tok_per_s": n_tok / median,
           "matmul_gflops": 6 * mm * n_tok / median / 1e9, "best_matmul_gflops": 6 * mm * n_tok / times[0] / 1e9}
    # model FLOPs with attention's matmuls (PaLM convention: 12 x layers x seq x hidden per token, fwd+bwd)
    seq = cfg.seq_len + 2
    out["model_tflops"] = (6 * mm + 12 * depth * seq * hidden) * n_tok / median / 1e12
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    p.add_argument("--depth-768", type=int, default=4, help="layers of the rar-b-width model (rar-b has 24)")
    p.add_argument("--depth-256", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1, help="attention/MLP dropout (the recipes use 0.1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (train.compile=true)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = gemm_gflops(device, 8192, dtype=torch.bfloat16)
        print(f"bf16 GEMM 8192^3: {peak / 1e3:.1f} TFLOP/s (H100 SXM dense bf16 spec: {H100_BF16_DENSE_TFLOPS:.0f})")
    else:
        peak = gemm_gflops(device)
        print(f"fp32 GEMM 2048^3: {peak:.1f} GFLOP/s (best of 5)")
    for hidden, depth, heads in ((768, args.depth_768, 16), (256, args.depth_256, 8)):
        r = bench_model(hidden, depth, heads, args.batch, args.steps, device, args.dropout, args.compile)
        line = (f"hidden {hidden} depth {depth} heads {heads} batch {args.batch}: {r['tok_per_s']:.0f} tok/s, "
                f"step {r['step_s'] * 1e3:.0f} ms (best {r['best_step_s'] * 1e3:.0f}), matmul {r['matmul_gflops']:.1f} GFLOP/s "
                f"(best {r['best_matmul_gflops']:.1f})")
        if device.type == "cuda":
            line += f", model {r['model_tflops']:.0f} TFLOP/s = MFU {100 * r['model_tflops'] / H100_BF16_DENSE_TFLOPS:.1f}%"
        else:
            line += f" = {r['matmul_gflops'] / peak:.2f} of GEMM"
        print(line, flush=True)


if __name__ == "__main__":
    main()
