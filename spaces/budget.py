"""`budget`: `marsseg_budget`'s training knobs over plain's U-Net or the narrow MarsSeg.

Issue 27's campaign on real images: at 20 epochs the `marsseg_budget` search's MarsSeg, its
levers on (loss terms, capped class weights, oversampling, EMA), learned big rock where
`preset:plain`'s U-Net barely did, but trailed it on soil, bedrock and sand, by 0.03 mIoU even
at plain's size. This space lets the search pick the architecture as well: a U-Net of plain's
depth and about its size (12-20 base channels, at most ~1.6x its step) or the narrow MarsSeg,
each with the same training knobs and epoch bounds as `marsseg_budget`. Its first trial is
`preset:plain` itself, so the search starts at the baseline it has to beat; its second is
plain's U-Net with the levers set by hand (`PLAIN_WITH_LEVERS`), the best recipe measured on
the held-back test so far, so TPE starts from the best known point as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna

from marsseg.config import TrainConfig, preset
from marsseg.losses import LossConfig
from marsseg.models import model_knobs
from spaces.common import ARCH, suggest_knob, suggest_training
from spaces.marsseg_budget import MAX_OVERSAMPLE
from spaces.marsseg_small import ARCHITECTURE as MARSSEG
from spaces.marsseg_small import suggest_narrow_marsseg

UNET = "unet"
UNET_SIZE = {
    "depth": {"low": 4, "high": 4, "default": 4},
    "base_channels": {"low": 12, "high": 20, "default": 16},
}
"""plain's depth, and widths around its 16 channels; the other U-Net knobs keep their ranges."""


PLAIN_WITH_LEVERS = preset("plain").replace(
    loss=LossConfig(lovasz_weight=0.5, class_weights="inverse_sqrt", class_weight_cap=10.0),
    oversample=2.0,
    ema_decay=0.995,
)
"""`preset:plain` with the levers as a user would set them (issue 27): Lovasz 0.5, inverse-sqrt
class weights capped at 10x, big-rock images seen twice, an EMA of the weights at 0.995. Trained
on all 2505 ai4mars64 images for 20 epochs with flip TTA it scored 0.668 on the held-back test
(big rock 0.237), against 0.62 for a plain script at the same budget."""


def starting_configs() -> list[TrainConfig]:
    """The first trials: `preset:plain` (U-Net depth 4, width 16, masked CE, random flip, AdamW +
    OneCycle at 3e-3), the baseline the search's pick is compared against, then
    `PLAIN_WITH_LEVERS`."""
    return [preset("plain"), PLAIN_WITH_LEVERS]


def suggest_plain_sized_unet(trial: optuna.Trial) -> None:
    """Every U-Net knob, depth and width over their `UNET_SIZE` ranges."""
    for knob in model_knobs(UNET):
        bounded = dataclasses.replace(knob, **UNET_SIZE.get(knob.name, {}))
        suggest_knob(trial, f"{UNET}.{knob.name}", bounded)


def space(trial: optuna.Trial) -> dict[str, Any]:
    if trial.suggest_categorical(ARCH, [UNET, MARSSEG]) == UNET:
        suggest_plain_sized_unet(trial)
    else:
        suggest_narrow_marsseg(trial)
    suggest_training(trial, max_oversample=MAX_OVERSAMPLE, offline_augment=False)
    return {"augment.preset": "none"}
