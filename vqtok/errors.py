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
