"""The epoch-result contract: the names of what `fit` hands `on_epoch` each epoch.

The loop writes these keys and everything downstream reads them (the CLI's progress line, Ray
Tune's scheduler and searcher, the leaderboard, the timeline, compare and final), so they are
named once here instead of as string literals in each reader.
"""

from __future__ import annotations

from marsseg.classes import CLASS_NAMES, SCORED_CLASSES

EPOCH = "epoch"
"""1-based number of the epoch just trained: the step that schedulers and Optuna count in."""
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_MIOU = "val_miou"
"""This epoch's validation mIoU over classes 1-4: the search's objective."""
VAL_MIOU_BEST = "val_miou_best"
"""The best validation mIoU so far: what a finished run keeps (early stopping's weights)."""
IOU_KEYS = {c: f"val_iou_{CLASS_NAMES[c].replace(' ', '_')}" for c in SCORED_CLASSES}
"""Per-class IoU names by class index: val_iou_soil, val_iou_bedrock, val_iou_sand, ..."""
SCORE_KEYS = (VAL_MIOU, *IOU_KEYS.values())
"""The scores a run is ranked and reported by."""
PIXEL_ACCURACY = "val_pixel_accuracy"
LR = "lr"
EPOCH_TIME_S = "epoch_time_s"
IMAGES_PER_S = "train_images_per_s"
DATA_WAIT = "data_wait_fraction"
FINISHED = "finished"
"""True on the last epoch of a run that ended by itself (not stopped from outside)."""
STOP_REASON = "stop_reason"
"""Why a finished run ended: `max_epochs` or `early_stopping`; empty on every other epoch."""

EPOCH_METRICS = (
    EPOCH,
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_MIOU,
    VAL_MIOU_BEST,
    *IOU_KEYS.values(),
    PIXEL_ACCURACY,
    LR,
    EPOCH_TIME_S,
    IMAGES_PER_S,
    DATA_WAIT,
    FINISHED,
    STOP_REASON,
)
"""Every key `on_epoch` receives each epoch (the val_* ones only when there is a validation set)."""
