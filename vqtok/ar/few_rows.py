"""A linear layer applied to the few rows of one decode step, fast on CPU.

A decode step of a raster generator runs its output head over a handful of rows (a batch of 8 under CFG mixed
before the head) against a large weight (LlamaGen: 16384 codes x 768). `x @ W^T` (what nn.Linear calls) makes
the CPU GEMM repack the whole weight for every call; `(W @ x^T)^T` reads it once, in its stored row order.
The sums are the same products added in another order (results agree to float rounding, ~1e-7 relative).
Measured on the 2-core CPU machine (bench/README.md): 8 rows x 16384 x 384, 6.4 ms against 10.8 ms.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 64  # more rows than this amortise the packing: nn.Linear is as fast or faster
MIN_WEIGHT = 1 << 20  # weights below this many elements stay in cache, where the two orders cost the same


def uses_transposed_product(x: torch.Tensor, layer: nn.Linear) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type == "cpu" and 0 < rows <= MAX_ROWS and layer.weight.numel() >= MIN_WEIGHT
            and x.dtype == layer.weight.dtype and not torch.is_autocast_enabled("cpu"))


def linear_few_rows(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(x)` for x (..., in_features) with few rows: the transposed product on CPU for a large weight
    (contiguous (..., out_features) output), nn.Linear elsewhere."""
    if not uses_transposed_product(x, layer):
        return layer(x)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(layer.weight, flat.t()).t().contiguous()
    if layer.bias is not None:
        out += layer.bias
    return out.view(*x.shape[:-1], layer.weight.shape[0])
