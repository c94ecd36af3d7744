"""Timing helpers of the bench scripts (each runs as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls, the device synchronised
    before and after each timed call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times
