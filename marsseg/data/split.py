"""Seeded train/validation splits and k-fold plans, stratified by the rare class.

"Big rock" (class 4) appears in only ~2.5% of images, so an unstratified 20% validation split
can hold a handful of them or none, and its class-4 IoU (the score's bottleneck) would be noise.
Each split keeps the share of big-rock images equal on both sides.
"""

from __future__ import annotations

import numpy as np

from marsseg.classes import BIG_ROCK
from marsseg.errors import ConfigError


def contains_class(masks: np.ndarray, cls: int = BIG_ROCK) -> np.ndarray:
    """(N,) bool: which masks contain at least one pixel of `cls`."""
    return (masks.reshape(len(masks), -1) == cls).any(axis=1)


def _strata(masks: np.ndarray, seed: int) -> list[np.ndarray]:
    """The indices of each stratum (with / without big rock), each in a seeded random order."""
    rng = np.random.default_rng(seed)
    has_rock = contains_class(masks)
    return [rng.permutation(np.flatnonzero(has_rock == flag)) for flag in (True, False)]


def train_val_split(
    masks: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices; each stratum contributes round(fraction * size)."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for stratum in _strata(masks, seed):
        n_val = round(val_fraction * len(stratum))
        val.append(stratum[:n_val])
        train.append(stratum[n_val:])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ConfigError(
            f"val_fraction {val_fraction:g} of {len(masks)} images leaves {len(train_idx)} for "
            f"training and {len(val_idx)} for validation; each needs at least one image"
        )
    return train_idx, val_idx


def kfold_plans(
    masks: np.ndarray, k: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k sorted (train, validation) index pairs; the validation folds partition the data."""
    if k < 2:
        raise ConfigError(f"folds must be at least 2, got {k}")
    if k > len(masks):
        raise ConfigError(f"{k} folds need at least {k} images, and there are {len(masks)}")
    folds: list[list[np.ndarray]] = [[] for _ in range(k)]
    offset = 0
    for stratum in _strata(masks, seed):
        # Deal each stratum round-robin, continuing where the last stratum stopped, so fold
        # sizes differ by at most one overall and big-rock images spread evenly.
        for i, index in enumerate(stratum):
            folds[(offset + i) % k].append(index)
        offset += len(stratum)
    everything = np.arange(len(masks))
    plans = []
    for fold in folds:
        val = np.sort(np.asarray(fold, dtype=np.int64))
        plans.append((np.setdiff1d(everything, val), val))
    return plans
