"""`marsseg_budget`: MarsSeg whose every trial costs at most about twice a plain U-Net's epoch.

For searches where epochs are scarce (a CPU, or a few GPU hours): the architecture is
`marsseg_small`'s narrow MarsSeg (at most ~1.4x `preset:plain`'s training step on a CPU), and
the images an epoch holds are bounded too: no offline preset (its flip doubles the training set;
the online pipeline and `augment.random_flip` flip instead) and big-rock images shown at most 3x
(on AI4Mars-like data, where ~10% of images hold big rock, an epoch grows by at most ~1.2x). Loss
terms, class-weight cap, schedule, EMA, online augmentation and oversampling are still sampled.
Its first trial is the plain baseline's recipe on MarsSeg (`starting_configs`).
"""

from __future__ import annotations

from typing import Any

import optuna

from marsseg.config import ModelConfig, TrainConfig, preset
from spaces.common import ARCH, suggest_training
from spaces.marsseg_small import ARCHITECTURE, NARROW, suggest_narrow_marsseg

MAX_OVERSAMPLE = 3.0


def starting_configs() -> list[TrainConfig]:
    """The first trial: the plain baseline's recipe (`preset:plain`: masked CE, random flip,
    AdamW + OneCycle at 3e-3, batch 32) on this space's largest MarsSeg. The reference recipe
    lies outside the space; this anchors TPE at a known good recipe instead, and the search
    never ends below it."""
    knobs = {name: bounds["high"] for name, bounds in NARROW.items()}
    return [preset("plain").replace(model=ModelConfig(ARCHITECTURE, knobs))]


def space(trial: optuna.Trial) -> dict[str, Any]:
    suggest_narrow_marsseg(trial)
    suggest_training(trial, max_oversample=MAX_OVERSAMPLE, offline_augment=False)
    return {ARCH: ARCHITECTURE, "augment.preset": "none"}
