"""`marsseg_small`: the `marsseg` space with the encoder and decoder held narrow and shallow.

On a CPU (or a small GPU budget) epochs are what buy quality: at width 0.125 with two middle
blocks a MarsSeg step costs about a quarter of the default model's, so the same hours give four
times the epochs. The blocks and the rest of the space are `marsseg`'s; only the ranges of the
size knobs shrink. The reference recipe's MarsSeg lies outside them, so this space starts from
TPE alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna

from marsseg.models import model_knobs
from spaces.common import ARCH, suggest_knob, suggest_training

ARCHITECTURE = "marsseg"
NARROW = {
    "width": {"low": 0.125, "high": 0.1875, "default": 0.125},
    "middle_blocks": {"low": 1, "high": 3, "default": 2},
    "decoder_channels": {"low": 32, "high": 64, "default": 32},
}
"""The size knobs' ranges here; every other knob keeps the registry's range."""


def suggest_narrow_marsseg(trial: optuna.Trial) -> None:
    """Every MarsSeg knob, the size knobs over their `NARROW` ranges."""
    for knob in model_knobs(ARCHITECTURE):
        narrowed = dataclasses.replace(knob, **NARROW.get(knob.name, {}))
        suggest_knob(trial, f"{ARCHITECTURE}.{knob.name}", narrowed)


def space(trial: optuna.Trial) -> dict[str, Any]:
    suggest_narrow_marsseg(trial)
    suggest_training(trial)
    return {ARCH: ARCHITECTURE}
