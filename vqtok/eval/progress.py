"""Progress for evaluation passes: a rich bar with img/s and ETA on a terminal, plain lines otherwise.

Progress goes to stderr so that stdout keeps only results (tables, JSON paths) for scripts to read.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

LOG_EVERY_S = 15.0


@contextlib.contextmanager
def image_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`: call it after each batch of n images."""
    if not enabled:
        yield lambda n: None
        return
    start = last = time.perf_counter()
    done = 0
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        task = bar.add_task(label, total=total, rate="-")
        with bar:
            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(task, advance=n, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")

            yield advance
        return

    def advance_plain(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S or done >= total:
            last = now
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            print(f"{label}: {done}/{total} images, {rate:.1f} img/s, eta {eta:.0f}s", file=sys.stderr, flush=True)

    yield advance_plain
