"""Helpers shared by the trainer's tests: a small config, an interrupted-then-resumed run, metrics
minus timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from marsseg.config import TrainConfig
from marsseg.train import fit

TIMING_KEYS = {"epoch_time_s", "train_images_per_s", "data_wait_fraction"}


def small_config(**changes: Any) -> TrainConfig:
    """A U-Net small enough to train an epoch in a second or two on a few dozen images."""
    base = {
        "model": {"name": "unet", "knobs": {"depth": 2, "base_channels": 8}},
        "optim": {"lr": 3e-3},
        "batch_size": 16,
        "max_epochs": 3,
        "val_fraction": 0.25,
        "augment": {"preset": "none"},
        "oversample": 2.0,
    }
    base.update(changes)
    return TrainConfig.from_dict(base)


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def resumed_after(config: TrainConfig, archive: Any, folder: Path, epoch: int) -> list[dict]:
    """Train, checkpointing every epoch, kill the run after `epoch`, then resume it from the
    checkpoint in a process whose RNG has moved on; the metrics of the resumed epochs."""
    checkpoint = folder / "ckpt.pt"

    class Interrupted(Exception):
        pass

    def stop(metrics: dict[str, Any], state: Any) -> None:
        state.save(checkpoint)
        if metrics["epoch"] == epoch:
            raise Interrupted

    try:
        fit(config, archive, on_epoch=stop, cache_dir=folder / "cache")
    except Interrupted:
        pass
    else:
        raise AssertionError(f"the run ended before epoch {epoch}")
    torch.manual_seed(12345)  # whatever the process did meanwhile must not matter
    resumed: list[dict[str, Any]] = []
    fit(
        config,
        archive,
        on_epoch=lambda metrics, state: resumed.append(dict(metrics)),
        checkpoint=checkpoint,
        cache_dir=folder / "cache",
    )
    return resumed
