"""`default`: any registered architecture with its own knobs, plus loss, augmentation,
oversampling and optimiser. Architectures come from the registry, so a new one joins the search
by registering itself."""

from __future__ import annotations

import optuna

from marsseg.models import list_models
from spaces.common import ARCH, suggest_architecture, suggest_training


def space(trial: optuna.Trial) -> None:
    arch = trial.suggest_categorical(ARCH, list_models())
    suggest_architecture(trial, arch)
    suggest_training(trial)
