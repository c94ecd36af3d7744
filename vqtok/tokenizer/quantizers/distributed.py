"""The few collective operations the quantizers need, each a no-op outside torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist_ready() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (not differentiable; use for statistics and EMA sums)."""
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
    if not dist_ready() or dist.get_world_size() == 1:
        return tensor
    return _AllReduceMean.apply(tensor)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N_r, D) rows in rank order (N_r may differ between ranks)."""
    if not dist_ready() or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
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
