"""`reference`: the reference team's recipe as one fixed configuration (nothing is sampled).

Running it through the search gives the recipe's score under exactly the same trainer, budget
and reporting as the searched trials: the baseline every search is compared with.
"""

from __future__ import annotations

from typing import Any

import optuna

from marsseg.config import preset
from spaces.common import config_to_params
from spaces.default import space as default_space


def space(trial: optuna.Trial) -> dict[str, Any]:
    return config_to_params(preset("reference"), default_space)
