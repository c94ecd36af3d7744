"""The one process-group module: torchrun setup, rank queries, gradient averaging and every collective.

Everything here is a no-op (or the identity) without an initialised process group, so single-process
code paths call the same functions. Commands (training, sampling, encoding) join the group once with
`init_distributed` and pass the returned `DistEnv` around; library code that may run inside such a
command (quantizers, GAN losses, dataset streams) asks the group state directly (`dist_ready`,
`world_size`, `rank_and_world` and the collectives at the end of this module).

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
from typing import Any

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
    owns_group: bool = False  # init_distributed created the process group (so the command tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str | None = None) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA).

    Each rank takes the CUDA device of its LOCAL_RANK. A group that is already initialised is joined,
    not re-created (`owns_group` tells which happened)."""
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
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device, owns_group=owns)


def shutdown_distributed() -> None:
    if dist_ready():
        dist.destroy_process_group()


def barrier(env: DistEnv | None = None) -> None:
    """Wait for every rank (`env`, or without it the group state, says whether there are others)."""
    if env.enabled if env is not None else world_size() > 1:
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


def mean_over_ranks(values: torch.Tensor, env: DistEnv | None = None) -> torch.Tensor:
    """Mean of `values` over ranks as a new tensor (not differentiable; see `all_reduce_mean`).
    Without `env` the group state decides; a single process gets `values` back unchanged."""
    if env.enabled if env is not None else world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on at least one (for stop / NaN decisions)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ------------------------------------------------------------------------------ group state queries


def dist_ready() -> bool:
    """True when a process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist_ready() else 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world) from the process group, else from torchrun's environment (DataLoader workers
    and processes that never joined the group still see their launcher's rank)."""
    if dist_ready():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ------------------------------------------------------------------- collectives for library code


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (not differentiable; for statistics and EMA sums)."""
    if dist_ready():
        dist.all_reduce(tensor)
    return tensor


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks whose backward also averages, so every rank gets the gradient of the global mean."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable mean of `tensor` over ranks; identity without a process group."""
    if world_size() == 1:
        return tensor
    return _AllReduceMean.apply(tensor)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N_r, D) rows in rank order (N_r may differ between ranks)."""
    world = world_size()
    if world == 1:
        return rows
    n = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = rows.new_zeros((most,) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank `src`'s tensor to every rank in place, so random choices (k-means, restarts) agree."""
    if dist_ready():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the argument is ignored on the others)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_refused(message: str | None) -> None:
    """Rank 0's refusal (a UserError message, or None) reaches every rank and is raised on all of them,
    so a refused command stops every rank instead of leaving the others waiting at a collective."""
    message = broadcast_object(message)
    if message:
        raise UserError(message)
