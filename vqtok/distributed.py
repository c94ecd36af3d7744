"""Data parallelism under torchrun: process group setup, gradient averaging, rank-0-only output.

Gradients are averaged explicitly (flattened buckets, one all-reduce each) after the accumulation
window instead of through DDP's autograd hooks, because tokenizer training does things DDP's reducer
does not support: `autograd.grad` on the decoder's last layer (adaptive weight), several discriminator
forwards per step and R1's double backward. The arithmetic is the same as DDP: the mean of the ranks'
gradients, so a W-rank run with per-rank batch B/W matches a single-process run with batch B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from vqtok.device import pick_device
from vqtok.errors import UserError

BUCKET_BYTES = 64 * 1024 * 1024


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str | None = None) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def average_gradients(params: list[nn.Parameter], env: DistEnv) -> None:
    """Replace every gradient by its mean over ranks (parameters without a gradient get zeros)."""
    if not env.enabled:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must take part in the same all-reduce
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket, env.world)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, env.world)


def _reduce_bucket(bucket: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in bucket:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module, env: DistEnv) -> None:
    """Make every rank hold rank 0's parameters and buffers (as DDP does at construction)."""
    if not env.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= env.world
    return values


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on at least one (for stop / NaN decisions)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
