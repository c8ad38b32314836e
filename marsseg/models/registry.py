"""The model registry: `@register_model` puts a builder in, `build_model` is the single way out.

As in timm, code that uses models (training, the search spaces, the CLI) never names an
architecture; it asks the registry. A new architecture joins by decorating its class in a new
module of this package (the package imports every module on import) and nothing else changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from marsseg.errors import ConfigError
from marsseg.models.knobs import Knob

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: how to build it and which knobs it takes."""

    name: str
    builder: Callable[..., nn.Module]
    knobs: tuple[Knob, ...]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, knobs: Sequence[Knob] = ()) -> Callable[[Builder], Builder]:
    """Class (or function) decorator registering an architecture under `name`.

    Every knob must be a keyword argument of the builder with the knob's default, so the two can
    never drift apart; a builder that takes `**kwargs` (a wrapper around another model) may accept
    knobs it does not list by name. A mismatch is a bug in the model's code and fails at import.
    """
    knobs = tuple(knobs)

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _check_knobs_match_signature(name, builder, knobs)
        _REGISTRY[name] = ModelEntry(name, builder, knobs)
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_REGISTRY)


def model_knobs(name: str) -> tuple[Knob, ...]:
    """The typed knobs of architecture `name`, in the order its constructor lists them."""
    return _entry(name).knobs


def build_model(name: str, **knobs: Any) -> nn.Module:
    """Build architecture `name` with `knobs` (all others at their defaults).

    Input (B, 1, H, W) float, output (B, NUM_CLASSES, H, W) logits. Raises `ConfigError` for an
    unknown architecture, an unknown knob or a value outside its knob's range.
    """
    entry = _entry(name)
    allowed = {knob.name: knob for knob in entry.knobs}
    checked = {}
    for key, value in knobs.items():
        if key not in allowed:
            names = ", ".join(allowed) or "none"
            raise ConfigError(f"{name} has no knob {key!r}; its knobs are: {names}")
        checked[key] = allowed[key].validate(value, owner=name)
    return entry.builder(**checked)


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ConfigError(f"unknown architecture {name!r}; registered: {known}") from None


def _check_knobs_match_signature(
    name: str, builder: Callable[..., nn.Module], knobs: tuple[Knob, ...]
) -> None:
    names = [knob.name for knob in knobs]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: knob names repeat: {names}")
    parameters = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for knob in knobs:
        parameter = parameters.get(knob.name)
        if parameter is None and takes_any:
            continue
        if parameter is None or parameter.default != knob.default:
            found = "missing" if parameter is None else f"default {parameter.default!r}"
            raise ValueError(
                f"{name}: knob {knob.name!r} (default {knob.default!r}) does not match the "
                f"builder's keyword argument ({found})"
            )
