"""Filesystem faults (disk full, read-only destination, permission denied, a file where a directory
should be) are user errors: one line naming the path and what to do, exit code 2, never a traceback.

Writers that hide the `OSError` behind their own exception (torch.save raises RuntimeError, safetensors
a SafetensorError) go through `recording_writer` / `safetensors_os_error`, so the real cause is known.
"""

from __future__ import annotations

import contextlib
import errno
import io
import re
from pathlib import Path
from typing import Iterator

from vqtok.errors import UserError

_SPACE = "free some space (or raise the file-size limit) and rerun the same command: it resumes where it stopped"
_REASONS = {
    errno.ENOSPC: ("no space left on device", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EFBIG: ("file too large (the file system or the process's file-size limit is full)", _SPACE),
    errno.EROFS: ("read-only file system", "choose a writable destination"),
    errno.EACCES: ("permission denied", "choose a destination you can write to"),
    errno.EPERM: ("operation not permitted", "choose a destination you can write to"),
    errno.ENOTDIR: ("a component of the path is a file, not a directory", "pass a directory path"),
    errno.EISDIR: ("it is a directory", "pass a file path"),
    # mkdir(exist_ok=True) raises EEXIST only when the path exists and is not a directory
    errno.EEXIST: ("it is a file, not a directory", "pass a directory path"),
    errno.EIO: ("input/output error (the disk or its file system failed)", "check the disk and rerun the same command"),
}


_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


class FilesystemError(UserError):
    """A write or read the filesystem refused, for a reason the user can fix."""


def filesystem_error(exc: OSError, path: str | Path | None = None, action: str = "write") -> FilesystemError | None:
    """The one-line user error for a filesystem fault, or None when `exc` is not one (then it is a bug)."""
    known = _REASONS.get(exc.errno)
    if known is None and exc.errno is None and _SHORT_WRITE.search(str(exc)):
        known = ("a short write (the disk is full or the file-size limit was reached)", _SPACE)  # numpy's tofile
    if known is None:
        return None
    reason, hint = known
    where = path if path is not None else exc.filename
    target = f" {where}" if where else ""
    return FilesystemError(f"cannot {action}{target}: {reason}; {hint}")


@contextlib.contextmanager
def writing(path: str | Path, action: str = "write") -> Iterator[None]:
    """Turn a filesystem fault inside the block into a `FilesystemError` naming `path`."""
    try:
        yield
    except OSError as exc:
        err = filesystem_error(exc, path, action)
        if err is None:
            raise
        raise err from None


class RecordingWriter(io.RawIOBase):
    """A write-only file wrapper that remembers the OSError a write raised (torch.save reports only
    'unexpected pos' when the disk fills up)."""

    def __init__(self, fh):
        super().__init__()
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj, path: Path) -> None:
    """`torch.save` to `path`; a filesystem fault becomes a `FilesystemError` naming the file."""
    import torch

    with writing(path):
        with open(path, "wb") as fh:
            writer = RecordingWriter(fh)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise


def safetensors_os_error(exc: Exception) -> OSError | None:
    """The OSError inside a SafetensorError ("I/O error: File too large (os error 27)"), if any."""
    match = re.search(r"os error (\d+)", str(exc))
    return OSError(int(match.group(1)), str(exc)) if match else None
