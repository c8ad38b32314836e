"""Search spaces: Optuna define-by-run functions, one module per space, selected by name.

Each space module defines a module-level `space(trial)` (OptunaSearch pickles it by reference
for resume). `get_space(name)` returns it with its starting points, run first: the configs its
module's `starting_configs()` returns, or else the reference recipe (every space but
`reference`), so a search can never end worse than them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marsseg.config import preset
from marsseg.errors import ConfigError
from spaces.common import config_to_params, params_to_config

SPACE_NAMES = ("default", "marsseg", "marsseg_small", "marsseg_budget", "budget", "reference")

__all__ = ["SPACE_NAMES", "SearchSpace", "get_space", "params_to_config"]


@dataclass(frozen=True)
class SearchSpace:
    name: str
    space: Callable[..., Any]
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)


def get_space(name: str) -> SearchSpace:
    """A space by name, or your own as `package.module:function`; bad names are one line.

    Every space but `reference` starts from the reference recipe when it can express it.
    """
    if ":" in name:
        module_name, _, function = name.partition(":")
        try:
            space = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"cannot load search space {name!r}: {err}") from None
    elif name in SPACE_NAMES:
        space = importlib.import_module(f"spaces.{name}").space
    else:
        known = ", ".join(SPACE_NAMES)
        raise ConfigError(f"unknown search space {name!r}; known: {known} (or module:function)")
    if name == "reference":
        return SearchSpace(name, space)
    module = importlib.import_module(space.__module__)
    starts = getattr(module, "starting_configs", lambda: [preset("reference")])()
    points = []
    for config in starts:
        # a custom space that cannot express the recipe starts from TPE alone
        with contextlib.suppress(ValueError):
            points.append(config_to_params(config, space))
    return SearchSpace(name, space, points)
