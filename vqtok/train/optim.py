"""The one optimizer + learning-rate schedule shape of every trainer, and the schedule as a function of the step.

Both trainers configure each optimizer with the same two dataclasses:

    optim:                                   # train-ar; train-tokenizer has optim.generator / optim.discriminator
      kind: adamw                            # adam | adamw
      lr: 4.0e-4                             # peak learning rate (after warm-up)
      betas: [0.9, 0.96]
      weight_decay: 0.03
      eps: 1.0e-8
      grad_clip: 1.0                         # max global gradient norm; 0 = off
      schedule:
        kind: cosine                         # constant | cosine | linear | step
        warmup: 100                          # linear warm-up length, counted in `unit`
        unit: epochs                         # steps | epochs: the unit of warmup and milestones
        end_lr: 1.0e-5                       # cosine / linear: the learning rate at the last step (absolute)
        milestones: []                       # step: multiply the LR by gamma from each of these on (in `unit`)
        gamma: 0.1

One rule for units: `warmup` and `milestones` count `unit`s; an epoch is one pass over the training set
(the trainer knows its length), so a task turns the schedule into steps once, with `in_steps`, before
the engine sees it. The schedule is a pure function of the step: nothing to checkpoint, exact on resume.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from vqtok.errors import ConfigError
from vqtok.validation import check_fields


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup: int | float = 0  # linear warm-up from lr/warmup to lr, counted in `unit`
    unit: Literal["steps", "epochs"] = "steps"
    end_lr: float = 0.0  # cosine and linear decay end here at the last step
    milestones: list[int | float] = field(default_factory=list)  # "step": LR x gamma from each of these on (in `unit`)
    gamma: float = 0.1

    # keys of the earlier shapes: a config that still uses one gets an error naming the replacement
    RENAMED_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "warmup_steps": ("warmup", " (with unit: steps, the default)"),
        "warmup_epochs": ("warmup", " (with unit: epochs)"),
        "min_lr_ratio": ("end_lr", ", an absolute learning rate: lr x min_lr_ratio"),
    }

    def check_ranges(self, where: str = "schedule") -> None:
        check_fields(self, where, {"warmup": {"low": 0.0}, "end_lr": {"low": 0.0}, "milestones": {"low": 0.0},
                                   "gamma": {"low": 0.0, "low_open": True}})
        if self.unit == "steps":
            fractional = [v for v in (self.warmup, *self.milestones) if float(v) != int(v)]
            if fractional:
                raise ConfigError(f"'{where}' counts whole steps (unit: steps) but has {fractional[0]:g}; "
                                  f"use whole numbers or {where}.unit=epochs")


@dataclass
class OptimizerConfig:
    """One optimizer (Adam/AdamW) with its clipping and LR schedule."""

    kind: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    RENAMED_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "end_lr": ("schedule.end_lr", ""),
        "warmup_epochs": ("schedule.warmup", " (with schedule.unit: epochs)"),
        "warmup_steps": ("schedule.warmup", " (with schedule.unit: steps)"),
        "min_lr_ratio": ("schedule.end_lr", ", an absolute learning rate: lr x min_lr_ratio"),
    }

    def check_ranges(self, where: str = "optim") -> None:
        check_fields(self, where, {
            "lr": {"low": 0.0, "low_open": True}, "betas": {"low": 0.0, "high": 1.0, "high_open": True},
            "weight_decay": {"low": 0.0}, "eps": {"low": 0.0, "low_open": True}, "grad_clip": {"low": 0.0},
        })
        if self.schedule.kind in ("cosine", "linear") and self.schedule.end_lr > self.lr:
            raise ConfigError(f"'{where}.schedule.end_lr' {self.schedule.end_lr:g} is above '{where}.lr' {self.lr:g}; "
                              "the schedule decays from lr to end_lr")


def in_steps(cfg: OptimizerConfig, steps_per_epoch: float) -> OptimizerConfig:
    """A copy whose schedule counts steps: epochs of warm-up and milestones become (rounded) optimizer steps."""
    sched = cfg.schedule
    if sched.unit == "epochs":
        if not steps_per_epoch > 0:
            raise ConfigError("a schedule in epochs needs a training set with at least one sample")
        sched = dataclasses.replace(sched, unit="steps", warmup=round(sched.warmup * steps_per_epoch),
                                    milestones=[round(m * steps_per_epoch) for m in sched.milestones])
    else:
        sched = dataclasses.replace(sched, warmup=int(sched.warmup), milestones=[int(m) for m in sched.milestones])
    return dataclasses.replace(cfg, schedule=sched)


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """The LR of `step` (0-based): linear warm-up from lr/warmup to lr, then constant, cosine or linear
    from lr down to end_lr at the last step (total_steps), or lr x gamma per milestone passed."""
    sched = cfg.schedule
    if sched.unit != "steps":
        raise ValueError("learning_rate needs a schedule in steps; convert it with in_steps first")
    warmup = int(sched.warmup)
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if sched.kind == "constant":
        return cfg.lr
    if sched.kind == "step":  # Open-MAGVIT2's lr_drop_epoch: x gamma after each milestone
        return cfg.lr * sched.gamma ** sum(step >= m for m in sched.milestones)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 1.0 - progress if sched.kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return sched.end_lr + (cfg.lr - sched.end_lr) * decay


__all__ = ["OptimizerConfig", "ScheduleConfig", "in_steps", "learning_rate"]
