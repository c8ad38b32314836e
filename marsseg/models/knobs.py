"""Typed descriptions of an architecture's knobs: what the search samples and `build_model` checks.

A `Knob` is the single source of truth for one constructor argument: its range is both the range
the search spaces sample from and the range `build_model` accepts, so a value a search could never
propose is also a value a config file cannot sneak in.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from marsseg.errors import ConfigError

KnobKind = Literal["int", "float", "bool", "categorical"]
KINDS: tuple[KnobKind, ...] = ("int", "float", "bool", "categorical")


@dataclass(frozen=True)
class Knob:
    """One searchable constructor argument of an architecture.

    `low`/`high` bound the numeric kinds (both inclusive), `log` asks the search to sample on a log
    scale, `step` restricts an int to `low + k * step`, and `choices` lists a categorical's values.
    A malformed definition is a bug in the model's code, so it raises `ValueError` at import time.
    """

    name: str
    kind: KnobKind
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    step: int | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        numeric = self.kind in ("int", "float")
        if numeric != (self.low is not None and self.high is not None):
            raise ValueError(f"knob {self.name!r}: low and high go with (and only with) numbers")
        if (self.kind == "categorical") != bool(self.choices):
            raise ValueError(f"knob {self.name!r}: choices go with (and only with) categoricals")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.step is not None and (self.kind != "int" or self.log or self.step < 1):
            raise ValueError(f"knob {self.name!r}: step must be a positive int on a linear int")
        if numeric and (self.low > self.high or (self.log and self.low <= 0)):
            raise ValueError(f"knob {self.name!r}: bad range [{self.low}, {self.high}]")
        if self.log and not numeric:
            raise ValueError(f"knob {self.name!r}: only numbers can be sampled on a log scale")
        self.validate(self.default, owner="default of")

    def validate(self, value: Any, owner: str) -> Any:
        """Return `value` in this knob's canonical type, or raise `ConfigError` naming the range.

        `owner` is the architecture's name; it starts the message so that a config with several
        models says which one is wrong.
        """
        where = f"{owner} knob {self.name!r}"
        if isinstance(value, np.generic):  # what numpy-based samplers hand out
            value = value.item()
        if self.kind == "categorical":
            for choice in self.choices:
                if _same_type_family(value, choice) and value == choice:
                    return choice
            raise ConfigError(f"{where} must be one of {self.choices}, got {value!r}")
        if self.kind == "bool":
            if isinstance(value, bool):
                return bool(value)
            raise ConfigError(f"{where} must be True or False, got {value!r}")
        if not (_is_int(value) if self.kind == "int" else _is_real(value)):
            kind = "an int" if self.kind == "int" else "a number"
            raise ConfigError(f"{where} must be {kind} in {self.range_text()}, got {value!r}")
        number = int(value) if self.kind == "int" else float(value)
        off_step = self.step is not None and (number - self.low) % self.step != 0
        if not self.low <= number <= self.high or off_step:
            raise ConfigError(f"{where} must be in {self.range_text()}, got {value!r}")
        return number

    def range_text(self) -> str:
        """The allowed values as an error message shows them, e.g. `[8, 64] in steps of 8`."""
        if self.kind == "categorical":
            return f"one of {self.choices}"
        if self.kind == "bool":
            return "True or False"
        text = f"[{self.low}, {self.high}]"
        return text if self.step is None else f"{text} in steps of {self.step}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _same_type_family(value: Any, choice: Any) -> bool:
    """Keep `True == 1` and `8.0 == 8` from passing a categorical check meant for another type."""
    if isinstance(choice, bool) or isinstance(value, bool):
        return isinstance(choice, bool) and isinstance(value, bool)
    if _is_int(choice):
        return _is_int(value)
    return isinstance(value, type(choice))
