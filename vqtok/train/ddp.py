"""How the engine averages a phase's gradients over ranks, and its one per-step cross-rank vote.

A TrainTask chooses with its `grad_sync` attribute:

- "ddp": the engine wraps the phase's module in DistributedDataParallel. DDP's autograd hooks all-reduce
  gradient buckets while backward is still running, so communication overlaps the rest of backward.
  On every accumulation micro-step but the last the engine enters `no_sync()`, so gradients accumulate
  locally and are reduced once per optimizer step. The task's loss must run its forward through
  `Phase.forward(fn, *args)`: DDP only prepares its reducer for a backward that follows its own forward,
  and the engine refuses a ddp task whose loss bypasses it (its gradients would silently not be reduced).
- "explicit" (the default): after the accumulation window every gradient is replaced by its mean over
  ranks in flattened buckets (vqtok.distributed.average_gradients). This is for losses DDP's
  reducer cannot handle: `torch.autograd.grad` inside the loss (the tokenizer's adaptive GAN weight),
  double backward (R1), or several forwards of one module per backward (the discriminator).

Both give the mean of the ranks' gradients, so a W-rank run with per-rank batch B/W trains what one
process trains with batch B.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

GRAD_SYNC_MODES = ("ddp", "explicit")


def grad_sync_mode(task: Any) -> str:
    """The task's `grad_sync` attribute ("explicit" when it has none), checked."""
    mode = getattr(task, "grad_sync", "explicit")
    if mode not in GRAD_SYNC_MODES:
        raise ValueError(f"{type(task).__name__}.grad_sync is {mode!r}; use one of {', '.join(GRAD_SYNC_MODES)}")
    return mode


class _ForwardCall(nn.Module):
    """forward(fn, *args) = fn(*args): lets DDP treat any computation over `module`'s parameters as its forward.

    The parameters DDP registers (and hooks) are the wrapped module's own, so the task's loss may call any
    method of the module (not only `forward`) inside `fn`.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        return fn(*args, **kwargs)


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`module` inside DDP (bucket views: no gradient copies; buffers are not re-broadcast every forward,
    as in the explicit path, which never touches them)."""
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # newer torch names the per-forward buffer broadcast `forward_sync_buffers` (and deprecates the old name)
    named = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(_ForwardCall(module), device_ids=device_ids, gradient_as_bucket_view=True, **{named: False})


class HostVote:
    """"Is this true on any rank?" over a gloo group of CPU tensors, so asking never waits for the accelerator.

    The engine asks once per step (a stop signal may reach one rank only); with the default NCCL group that
    would mean a device tensor read back every step, a host sync. All ranks must construct it together.
    """

    def __init__(self, enabled: bool):
        self.group = dist.new_group(backend="gloo") if enabled else None

    def any(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t[0] > 0)
