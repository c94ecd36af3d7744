"""Run a test function on two (or more) gloo ranks in spawned processes and collect what each rank returns."""

from __future__ import annotations

from pathlib import Path

import torch


def _worker(rank: int, world: int, init_file: str, fn, inputs: list, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out[rank] = fn(inputs[rank])
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, inputs: list, tmp_path: Path) -> list:
    """[fn(inputs[rank]) for each rank], each computed on its own gloo rank (one thread) of len(inputs);
    `fn` must be a module-level function (the processes are spawned)."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(len(inputs), str(tmp_path / "init"), fn, inputs, out), nprocs=len(inputs), join=True)
    return [out[rank] for rank in range(len(inputs))]
