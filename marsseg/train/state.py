"""A run's checkpointable state: everything needed to continue exactly where it stopped."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from marsseg.config import TrainConfig
from marsseg.errors import ConfigError
from marsseg.fileio import atomic_path
from marsseg.train.schedule import Scheduler


@dataclass
class EpochState:
    """What a checkpoint holds; `on_epoch` receives it and may `save` it."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    ema: torch.optim.swa_utils.AveragedModel | None = None
    """The weight average (`ema_decay` > 0): what validation scores and `best_weights` hold."""
    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_weights: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated and kept: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_weights": self.best_weights,
            "history": self.history,
            "rng": _rng_states(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (temp file, then rename): never a half-written file."""
        with atomic_path(path) as temp:
            torch.save(self.state_dict(), temp)
        return Path(path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore everything from a checkpoint written by `save` (tensors and plain data only)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if TrainConfig.from_dict(state["config"]) != self.config:
            raise ConfigError(f"checkpoint {path} was written by a run with another config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for key in ("epoch", "best_score", "best_epoch", "bad_epochs", "best_weights", "history"):
            setattr(self, key, state[key])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _rng_states() -> dict[str, Any]:
    """torch's generators (numpy randomness comes from per-epoch seeded Generators, not globals)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states
