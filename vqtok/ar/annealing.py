"""Permutation annealing (RAR paper Eq. 5): the probability r of training on a random order.

    r = 1                              before start
    r = 1 - (t - start) / (end - start) between start and end
    r = 0                              from end on

`t` is in whatever unit start/end use: epochs (fractional; one epoch = one pass over the source images)
or optimizer steps (what the official code uses: 125k -> 187.5k of 250k steps at batch 2048).
"""

from __future__ import annotations

from dataclasses import dataclass

from vqtok.errors import UserError


def random_ratio(progress: float, start: float, end: float) -> float:
    if end < start:
        raise UserError(f"annealing end {end} comes before its start {start}")
    if progress < start:
        return 1.0
    if progress >= end:
        return 0.0
    return 1.0 - (progress - start) / (end - start)


@dataclass
class PermutationAnnealing:
    start: float
    end: float
    unit: str = "epoch"  # "epoch" or "step"

    def __post_init__(self):
        if self.unit not in ("epoch", "step"):
            raise UserError(f"annealing unit must be 'epoch' or 'step', got '{self.unit}'")
        if self.start < 0 or self.end < self.start:
            raise UserError(f"annealing needs 0 <= start <= end, got start {self.start} and end {self.end}")

    def ratio(self, step: int, steps_per_epoch: float | None = None) -> float:
        """r after `step` optimizer steps; `steps_per_epoch` is needed when the schedule is in epochs."""
        if self.unit == "step":
            return random_ratio(step, self.start, self.end)
        if not steps_per_epoch or steps_per_epoch <= 0:
            raise UserError("an annealing schedule in epochs needs the number of steps per epoch")
        return random_ratio(step / steps_per_epoch, self.start, self.end)


def annealing_warning(annealing: PermutationAnnealing, total_steps: int, steps_per_epoch: float, order: str) -> str | None:
    """One line when the run ends before annealing reaches r = 0, else None (start-of-run check, plans).

    The model samples in `order` only; a run that stops while r > 0 never trains on that order alone.
    """
    last = max(total_steps - 1, 0)  # the batch of the final update
    r_end = annealing.ratio(last, steps_per_epoch)
    if r_end <= 0.0:
        return None
    unit = "epochs" if annealing.unit == "epoch" else "steps"
    length = total_steps / steps_per_epoch if annealing.unit == "epoch" else total_steps
    window = f"annealing {annealing.start:g} -> {annealing.end:g} {unit} ends after the run ({length:.4g} {unit})"
    if r_end >= 1.0:
        what = "r = 1 for the whole run, so the model only ever sees random orders"
    else:
        what = f"r is still {r_end:.2f} at the last step"
    return (f"{window}: {what}, but it samples in the {order} order; "
            f"shorten --anneal or lengthen the run to reach r = 0")
