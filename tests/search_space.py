"""A search space for the search tests: the real training space on a tiny U-Net.

The architecture is a fixed constant (the returned dict), small enough to learn something in a
few CPU epochs; every training parameter is sampled as in the real spaces, so the reference
recipe's training parameters are still the first point the search enqueues.
"""

from __future__ import annotations

from typing import Any

import optuna

from spaces.common import ARCH, suggest_training

TINY_UNET = {ARCH: "unet", "unet.depth": 2, "unet.base_channels": 8}


def space(trial: optuna.Trial) -> dict[str, Any]:
    suggest_training(trial)
    return dict(TINY_UNET)


def failing(trial: optuna.Trial) -> dict[str, Any]:
    """A space every trial of which fails in the trainable, where no up-front check can see it:
    a learning rate so large that the loss is not finite after the first step."""
    suggest_training(trial)
    return {**TINY_UNET, "optim.lr": 1e30}
