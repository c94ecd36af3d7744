"""One run per output directory: `encode`, `train-*` and `sample` hold a lock on their `--out`.

The lock is a file beside the directory, `<parent>/.<name>.lock` (beside, not inside, so an empty
output directory stays empty and a directory replaced by a rename keeps its lock). It holds the owner's
pid, host, command (the one the user ran: `train-ar`, `encode`, ...), run directory and start time, and
is held with `flock`, which the kernel drops when the owner dies: a second run on the same directory is
refused in one line naming the owner, and a lock left by a killed process is taken over with a message.
Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from vqtok.errors import UserError
from vqtok.fs_errors import writing

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to the pid check alone
    fcntl = None


def lock_path(run_dir: str | Path) -> Path:
    real = Path(os.path.realpath(run_dir))
    return real.parent / f".{real.name}.lock"


def _note(text: str) -> None:
    sys.stderr.write(f"note: {text}\n")
    sys.stderr.flush()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        if not data.strip():
            return None  # a fresh lock file: nobody held it
        owner = json.loads(data.decode())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


_cli_command: str | None = None


def set_cli_command(name: str | None) -> None:
    """Record the vqtok subcommand this process runs (the CLI does, for the length of the invocation)."""
    global _cli_command
    _cli_command = name


def command_name(fallback: str) -> str:
    """The vqtok command this process runs (`train-ar`, `encode`, ...) when a CLI invocation is in
    progress, else `fallback` (library callers name their own)."""
    return _cli_command or fallback


def _describe(owner: dict, run_dir: Path | None = None) -> str:
    """'a `vqtok encode` run (pid 123 on host, started 2026-12-01 10:00:00, writing /abs/out)'; the run
    directory is named when the owner recorded it under another spelling than `run_dir`."""
    if not owner:
        return "an earlier run (its lock file is unreadable)"
    started = owner.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if isinstance(started, (int, float)) else ""
    held = owner.get("run_dir")
    where = f", writing {held}" if isinstance(held, str) and (run_dir is None or held != str(run_dir)) else ""
    return f"a `vqtok {owner.get('command', '?')}` run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}{when}{where})"


class RunLock:
    """A held lock; `release()` (or leaving the `run_lock` context) removes the file and unlocks."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __del__(self):
        self.release()


def acquire_run_lock(run_dir: str | Path, command: str, note: Callable[[str], None] = _note) -> RunLock:
    """Lock `run_dir` for `command` or raise a one-line `UserError` naming the run that holds it: its
    command, pid, host, start time and run directory. Inside a CLI invocation the command recorded is
    the one the user ran (`train-ar`, not the engine's generic "train"); `command` is the fallback."""
    command = command_name(command)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; pass a directory")
    ancestor = Path(os.path.abspath(run_dir)).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create --out {run_dir}: {ancestor} is not a directory")
    path = lock_path(run_dir)
    with writing(run_dir, "create"):
        path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        with writing(path, "create the run lock"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = _flock(fd)
            owner = _read_owner(fd)
            if not flocked or os.stat(path).st_ino != os.fstat(fd).st_ino:
                if flocked is None:  # held by a live process
                    raise UserError(
                        f"{run_dir} is in use by {_describe(owner or {}, run_dir)}; wait for it to finish or choose another --out"
                    )
                os.close(fd)  # the file was removed or replaced between open and lock: try again
                continue
            if owner is not None:
                note(f"took over the stale lock on {run_dir} left by {_describe(owner, run_dir)}, which is no longer running")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time(),
                  "run_dir": os.path.realpath(run_dir)}
            with writing(path, "write the run lock"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            return RunLock(path, fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise UserError(f"could not lock {run_dir}: its lock file {path} keeps changing; is another run starting there?")


def _flock(fd: int) -> bool | None:
    """True: locked. None: another process holds it. (Without flock support, a live owner pid counts.)"""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    owner = _read_owner(fd) or {}
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        return None
    return True


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str, note: Callable[[str], None] = _note) -> Iterator[RunLock | None]:
    """Hold the lock on `run_dir` for the block (rank 0 only under torchrun; other ranks get None)."""
    lock = acquire_run_lock(run_dir, command, note) if _is_rank_zero() else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
