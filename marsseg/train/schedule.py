"""Learning-rate schedules and the weight average, built from a `TrainConfig`.

Every kind but `plateau` is a torch scheduler stepped after each batch. Its length is the run's
exact number of optimiser steps over `max_epochs`, counted from the epochs' index plans before
training starts (a fractional oversampling rate makes epochs differ in length): the curve ends
where the budget ends, and a run stopped early has simply not reached the end of it.
The scheduler is stepped once more after the last update, so its curve has one point more than
the run has steps; that point is the curve's end, and it is the lr the last epoch reports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel

from marsseg.config import SchedulerConfig, TrainConfig
from marsseg.sampling import oversample_indices

WARMUP_START = 1 / 25
"""Warmup starts at lr / 25: OneCycleLR's default `div_factor`, used by `cosine` too."""
ONECYCLE_FINAL_DIV = 1e4
"""OneCycleLR's default: the last step's lr is the start's / 1e4."""

Scheduler = LRScheduler | ReduceLROnPlateau


def batches_per_epoch(plan_length: int, batch_size: int) -> int:
    """Optimiser steps of one epoch: the loader drops a ragged tail, but never the only batch."""
    return max(1, plan_length // batch_size)


def total_steps(config: TrainConfig, has_big_rock: np.ndarray) -> int:
    """Optimiser steps of a whole run of `max_epochs`, from the same plans the epochs will draw."""
    return sum(
        batches_per_epoch(
            len(oversample_indices(has_big_rock, config.oversample, epoch_rng(config.seed, e))),
            config.batch_size,
        )
        for e in range(config.max_epochs)
    )


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's index plan: a resumed run redraws the same plans."""
    return np.random.default_rng([seed, epoch])


def build_scheduler(
    config: SchedulerConfig, optimizer: torch.optim.Optimizer, steps: int
) -> Scheduler:
    """The scheduler of `config` over `steps` optimiser steps (ignored by `plateau`)."""
    if config.kind == "plateau":
        return ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=config.factor,
            patience=config.patience,
            min_lr=config.min_lr,
        )
    if config.kind == "onecycle":
        return OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=steps + 1,
            pct_start=config.warmup_fraction,
            div_factor=1 / WARMUP_START,
            final_div_factor=ONECYCLE_FINAL_DIV,
        )
    if config.kind == "cosine":
        base = optimizer.param_groups[0]["lr"]
        curve = functools.partial(
            warmup_cosine,
            steps=steps,
            warmup=max(1, round(config.warmup_fraction * steps)),
            floor=min(config.min_lr / base, 1.0),
        )
        return LambdaLR(optimizer, curve)
    return LambdaLR(optimizer, _constant)


def continue_on_curve(scheduler: LRScheduler, saved: dict[str, Any]) -> None:
    """Resume a per-batch schedule saved by a run of another `max_epochs` on `scheduler`, built
    over the new budget: from the step the run reached, on the new budget's curve.

    The run then follows the curve a run planned that long from the start follows, and ends
    where its budget ends (see the module docstring). Running on along the old curve instead
    would hold the lr at that curve's floor (onecycle's lr / 25e4, cosine's `min_lr`), where
    more epochs barely train. The price is a step in the lr at the seam, up to where the longer
    curve stands (a warm restart). ReduceLROnPlateau has no curve and is not passed here.
    """
    progress = {"last_epoch": saved["last_epoch"] - 1, "_step_count": saved["_step_count"] - 1}
    scheduler.load_state_dict({**scheduler.state_dict(), **progress})
    scheduler.step()  # sets the optimiser's lr (and onecycle's momentum) at the step reached


def warmup_cosine(step: int, *, steps: int, warmup: int, floor: float) -> float:
    """lr / base lr at `step`: linear from WARMUP_START to 1 over `warmup` steps, then a cosine
    from 1 down to `floor` at the last step."""
    if step < warmup:
        return WARMUP_START + (1 - WARMUP_START) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _constant(step: int) -> float:
    return 1.0


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights, or None when `decay` is 0.

    Buffers are averaged too (`use_buffers=True`), so the average's BatchNorm statistics are
    those of the averaged weights' recent activations rather than the stale ones of the
    initial copy. Early on the decay is held at (1 + n) / (10 + n) after n updates (as timm's
    warmup does), so a short run's average is not dominated by its random initial weights.
    """
    if not decay:
        return None
    return AveragedModel(model, avg_fn=functools.partial(_ema_step, decay=decay), use_buffers=True)


def _ema_step(average: Tensor, current: Tensor, updates: Tensor, *, decay: float) -> Tensor:
    if not average.is_floating_point():
        return current  # counters such as BatchNorm's num_batches_tracked follow the model
    beta = min(decay, (1 + float(updates)) / (10 + float(updates)))
    return average * beta + current * (1 - beta)


StepHook = Callable[[], None]
"""Called after every optimiser step (per-batch schedules, the weight average)."""
