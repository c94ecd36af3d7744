"""The resume set-up of the multi-scale quantizer tests: one quantizer trained a few steps, and a fresh one that
takes over its weights and its optimizer state, as `--resume` does."""

from __future__ import annotations

import copy
from typing import Callable

import torch


def trained_then_resumed(make: Callable[[], torch.nn.Module], steps: Callable, n: int = 5, lr: float = 1e-2):
    """(a, opt_a, b, opt_b): from seed 0, `a = make()` trained by `steps(a, opt_a, 0, n)` with Adam, then
    `b = make()` loading a's state dict (strictly) and a deep copy of its optimizer state (not the same moment
    tensors)."""
    torch.manual_seed(0)
    a = make()
    opt_a = torch.optim.Adam(a.parameters(), lr=lr)
    steps(a, opt_a, 0, n)
    b = make()
    b.load_state_dict(a.state_dict(), strict=True)
    opt_b = torch.optim.Adam(b.parameters(), lr=lr)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    return a, opt_a, b, opt_b
