"""Range checks for numeric options: every message names the option and its valid range.

`check_range("train.batch_size", 0, low=1)` raises "train.batch_size must be at least 1, got 0". Config
dataclasses call these from their `check_ranges(where)` method, which `vqtok.config.from_dict` runs with
the key path, so a bad recipe value or `key=value` override is named exactly; command-line options call
them with the flag's name.
"""

from __future__ import annotations

import math

from vqtok.errors import ConfigError, UserError


def _describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"greater than {low}" if low_open else f"at least {low}"
    return f"less than {high}" if high_open else f"at most {high}"


def check_range(name: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False,
                error: type[UserError] = ConfigError) -> None:
    """Raise `error` unless `value` is a finite number within the given bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok and isinstance(value, float) and math.isinf(value):
        ok = False  # an infinite rate, scale or size is never meant
    if not ok:
        raise error(f"{name} must be {_describe(low, high, low_open, high_open)}, got {value!r}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def check_fields(obj, where: str, rules: dict[str, dict]) -> None:
    """`check_range` for each field named in `rules` ({field: bounds}); `where` is the config key path."""
    for field, bounds in rules.items():
        value = getattr(obj, field)
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                check_range(f"{_join(where, field)}[{i}]", v, **bounds)
        elif value is not None:
            check_range(_join(where, field), value, **bounds)


def check_sampling_options(guidance: float | None = None, temperature: float | None = None, top_k: int | None = None,
                           top_p: float | None = None, power: float | None = None) -> None:
    """The sampling flags of `vqtok sample` (None: not given)."""
    for flag, value, bounds in (
        ("--cfg", guidance, {"low": 0.0}),
        ("--temperature", temperature, {"low": 0.0}),
        ("--top-k", top_k, {"low": 0}),
        ("--top-p", top_p, {"low": 0.0, "high": 1.0, "low_open": True}),
        ("--cfg-power", power, {"low": 0.0}),
    ):
        if value is not None:
            check_range(flag, value, error=UserError, **bounds)
