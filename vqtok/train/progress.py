"""Progress display and metrics.jsonl for the training engine (rank 0 only).

On a terminal: a rich progress bar with step, throughput, the main loss terms and ETA. Otherwise
(logs, CI, nohup): one plain line per logged step. Every logged step is also one JSON object in
RUN/metrics.jsonl: `step`, `epoch`, `lr` and every metric by name.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e4):
        return f"{v:.4f}"
    return f"{v:.3e}"


def _row_step(line: str, bad: int) -> int:
    try:
        row = json.loads(line)
    except ValueError:
        return bad
    return row.get("step", 0) if isinstance(row, dict) else bad


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            # Rows logged after the checkpoint we resume from will be logged again: drop them.
            # A torn last line (killed mid-write, disk full) is dropped too.
            kept = [line for line in path.read_text(errors="replace").splitlines() if _row_step(line, resume_step + 1) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.fh = open(path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.fh.close()


class Progress:
    """Rich bar on a TTY, plain lines otherwise. `unit` names the throughput (img/s, tok/s)."""

    def __init__(self, total: int, start: int, unit: str, enabled: bool, show_keys: tuple[str, ...] = ()):
        self.total, self.unit, self.enabled = total, unit, enabled
        self.show_keys = show_keys
        self.t0, self.start = time.perf_counter(), start
        self.rich = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.rich = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.rich.start()
            self.task = self.rich.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, throughput: float, metrics: dict[str, float], lr: float) -> None:
        if not self.enabled:
            return
        keys = [k for k in self.show_keys if k in metrics] or list(metrics)[:4]
        terms = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys)
        info = f"{throughput:.1f} {self.unit} lr={lr:.2e} {terms}"
        if self.rich is not None:
            self.rich.update(self.task, completed=step, info=info)
        else:
            elapsed = time.perf_counter() - self.t0
            done = max(step - self.start, 1)
            eta = elapsed / done * (self.total - step)
            print(f"step {step}/{self.total} {info} eta {format_seconds(eta)}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()
            self.rich = None


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
