"""Codebook usage over a sliding window of recent training steps, reduced over all ranks at log steps.

A batch of 8 images has 2,048 tokens: its own histogram cannot show a 16k codebook, so `q_usage` per batch
says little. The monitor keeps each step's code histogram (sparse, per scale for multi-scale quantizers)
for the last `window` steps; at a log step every rank calls `report()`, which all-reduces the summed
window (one collective, issued by the training engine at the same step on every rank) and returns:

    code_usage        fraction of codes hit in the window, all ranks (the smallest over eligible scales)
    code_perplexity   exp(entropy) of the window histogram (all scales pooled)
    dead_codes        codes not hit at all in the window
    code_usage_<h>x<w>, code_perplexity_<h>x<w>   per scale, multi-scale only

and, when the usage stays under `warn_below` for `patience` log rows in a row, a one-line warning.
Scales whose window holds fewer than 2 tokens per code cannot show full usage and are not warned about.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from vqtok.eval.codebook import summarize_counts


class CodebookMonitor:
    def __init__(self, codebook_size: int, scales: list[tuple[int, int]], window: int = 100,
                 warn_below: float = 0.0, patience: int = 3, hint: str = ""):
        self.codebook_size = int(codebook_size)
        self.scales = [tuple(s) for s in scales] if len(scales) > 1 else []
        n = max(1, len(self.scales))
        self.window = max(1, int(window))
        self.total = torch.zeros(n, self.codebook_size, dtype=torch.long)
        self.steps: deque[list[tuple[torch.Tensor, torch.Tensor]]] = deque()
        self.warn_below, self.patience, self.hint = float(warn_below), int(patience), hint
        self.low_rows = 0
        self.warned = False

    def push(self, counts: torch.Tensor) -> None:
        """Add one step's (scales, codebook_size) histogram of this rank; drop the step that left the window."""
        counts = counts.to("cpu", torch.long).reshape(self.total.shape)
        sparse = []
        for k in range(counts.shape[0]):
            idx = counts[k].nonzero().flatten()
            sparse.append((idx, counts[k, idx]))
            self.total[k, idx] += counts[k, idx]
        self.steps.append(sparse)
        while len(self.steps) > self.window:
            for k, (idx, c) in enumerate(self.steps.popleft()):
                self.total[k, idx] -= c

    def report(self, device: torch.device | None = None) -> tuple[dict[str, float], list[str]]:
        """Window statistics over all ranks (a collective when a process group is up) and any warning."""
        total = self.total
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = total.to(device if device is not None else "cpu").clone()
            dist.all_reduce(total)
            total = total.cpu()
        pooled = summarize_counts(total.sum(0))
        out = {"code_usage": pooled.usage, "code_perplexity": pooled.perplexity,
               "dead_codes": float(self.codebook_size - pooled.codes_used)}
        eligible = [(pooled.usage, pooled.codes_used, pooled.tokens, "")]
        if self.scales:
            eligible = []
            for (h, w), row in zip(self.scales, total):
                s = summarize_counts(row)
                out[f"code_usage_{h}x{w}"] = s.usage
                out[f"code_perplexity_{h}x{w}"] = s.perplexity
                if s.tokens >= 2 * self.codebook_size:
                    eligible.append((s.usage, s.codes_used, s.tokens, f" at scale {h}x{w}"))
            if eligible:
                out["code_usage"] = min(e[0] for e in eligible)
        notes = self._check(eligible)
        return out, notes

    def _check(self, eligible) -> list[str]:
        if self.warn_below <= 0:
            return []
        low = [e for e in eligible if e[2] >= 2 * self.codebook_size and e[0] < self.warn_below]
        if not low:
            self.low_rows, self.warned = 0, False
            return []
        self.low_rows += 1
        if self.low_rows < self.patience or self.warned:
            return []
        self.warned = True
        usage, used, _, where = min(low)
        return [
            f"warning: codebook usage{where} is {usage:.0%} ({used} of {self.codebook_size} codes over the last "
            f"{len(self.steps)} steps), under loss.usage_warn={self.warn_below:g} for {self.low_rows} log rows: "
            f"the codebook is collapsing{self.hint}"
        ]


