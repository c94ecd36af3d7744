"""Learning-rate schedules as pure functions of the step (nothing to checkpoint, exact on resume)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the base LR
    milestones: list[int] = field(default_factory=list)  # "step": multiply the LR by `gamma` from each of these steps on
    gamma: float = 0.1

    def check_ranges(self, where: str = "schedule") -> None:
        from vqtok.validation import check_fields

        check_fields(self, where, {"warmup_steps": {"low": 0}, "min_lr_ratio": {"low": 0.0, "high": 1.0}})


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1, then constant, cosine down to `min_lr_ratio` at total_steps, or
    step drops by `gamma` at each milestone."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":  # Open-MAGVIT2's lr_drop_epoch: x gamma after each milestone
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
