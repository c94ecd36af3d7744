"""Stop signals (SIGINT, SIGTERM) for every command.

SLURM, Kubernetes and `timeout` send SIGTERM, a terminal's Ctrl-C sends SIGINT, often to the whole process
group, DataLoader workers included. The rules:

- DataLoader workers ignore both (`loader_worker_init()` as `worker_init_fn`): the main process decides
  when to stop and shuts its workers down itself, so a worker never dies mid-batch and the main process
  never sees "DataLoader worker ... is killed by signal". A worker that ignores SIGTERM also ignores the
  `terminate()` with which multiprocessing ends daemonic children at interpreter exit (and then joins them
  without a timeout), so the main process SIGKILLs any such worker still alive when it exits (e.g. after
  an error left a DataLoader iterator unclosed); otherwise the process would hang after its last line.
- The training engine turns a stop signal into a clean stop at the end of the current step (it saves a
  checkpoint); other commands turn it into an `Interrupted` exception, so their `finally` blocks remove
  temporaries before the process exits.
- Either way the process exits with 128 + the signal number, as shells and schedulers expect of a run
  that did not finish.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived; the command cleans up and exits with 128 + the signal number.

    A BaseException, like KeyboardInterrupt, so `except Exception` clean-up code does not swallow it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code_for(signum: int) -> int:
    return 128 + int(signum)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGINT/SIGTERM (its parent shuts it down).

    torch installs a SIGTERM handler in each worker just before calling this, so ignoring here wins.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_exit_hook_registered = False


def loader_worker_init():
    """The `worker_init_fn` for every DataLoader (`ignore_stop_signals`); called in the main process when the
    loader is built, it also registers the exit hook that kills workers still alive at exit. Registered then,
    after `multiprocessing.util` (imported by torch.utils.data), the hook runs before multiprocessing's own
    exit handler (atexit runs last-registered first)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_leftover_workers)
        _exit_hook_registered = True
    return ignore_stop_signals


def _kill_leftover_workers() -> None:
    import multiprocessing

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report the kill as a failed worker
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
    for p in children:
        p.join(timeout=5)


@contextlib.contextmanager
def raise_on_stop_signals() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise `Interrupted` (so `finally` clean-up runs); restored after.

    Outside the main thread (where handlers cannot be installed) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
