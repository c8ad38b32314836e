"""`marsseg`: the `default` space with the architecture fixed to MarsSeg; its knobs still vary."""

from __future__ import annotations

from typing import Any

import optuna

from spaces.common import ARCH, suggest_architecture, suggest_training

ARCHITECTURE = "marsseg"


def space(trial: optuna.Trial) -> dict[str, Any]:
    suggest_architecture(trial, ARCHITECTURE)
    suggest_training(trial)
    return {ARCH: ARCHITECTURE}
