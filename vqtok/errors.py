"""User-facing errors.

A `UserError` is a mistake the user can fix (missing path, bad value, mismatched checkpoint, missing
weights file). The CLI prints its message as one line and exits with code 2, without a traceback.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A user mistake: printed as one clear sentence, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid config file, recipe key or override."""


def one_line(exc: BaseException) -> str:
    """The message of a user error as one line.

    A UserError raised in a DataLoader worker reaches the main process re-raised with the worker's whole
    traceback in its message ("Caught UserError in DataLoader worker process 0. Original Traceback ...");
    only the original message, its last line, is kept.
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name = type(exc).__name__
        for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
            if prefix in last:
                last = last.split(prefix, 1)[1]
                break
        text = last
    return " ".join(text.split())
