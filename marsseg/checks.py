"""One rule for numbers a user gives, whether as a flag, in a config file or in saved settings:
finite (NaN and infinities never mean anything here), of the right kind, inside the range, and
refused in one line that names the value's place, the rule and the value."""

from __future__ import annotations

import math

from marsseg.errors import ConfigError


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_number(
    value: object,
    what: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` if it is a finite number (an integer with `integer`) in the range; else a
    `ConfigError` naming `what`, the rule and the value. The one numeric rule for flags (through
    `integer_flag`/`number_flag`) and for settings read from files."""
    kind = "an integer" if integer else "a finite number"
    rule = _range_text(low, high, low_open, high_open)
    wrong = (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
        or not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if wrong:
        raise ConfigError(f"{what} must be {kind}{' ' + rule if rule else ''}, got {value!r}")
    return value
