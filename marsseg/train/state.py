"""A run's checkpointable state: everything needed to continue exactly where it stopped."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from marsseg.config import TrainConfig
from marsseg.errors import CheckpointError, ConfigError
from marsseg.fileio import atomic_path
from marsseg.train import keys
from marsseg.train.schedule import Scheduler, continue_on_curve


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
    resumed_from: Path | None = None
    """The checkpoint `load_newest` restored (None: a fresh start); not saved in checkpoints."""

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

    def save(self, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> Path:
        """Write the checkpoint atomically (temp file, then rename): never a half-written file.

        With `previous`, the file already at `path` is renamed there once the new one is fully
        written, just before the new one takes its place: the two newest checkpoints are kept,
        and a crash between the renames leaves the older one readable at `previous`."""
        path = Path(path)
        with atomic_path(path) as temp:
            torch.save(self.state_dict(), temp)
            if previous is not None and path.exists():
                os.replace(path, previous)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Restore everything from a checkpoint written by `save` (tensors and plain data only).

        A file that cannot be read raises `CheckpointError` before anything is restored; one
        that cannot continue as this config (`check_continuable`) raises `ConfigError`."""
        state = read_checkpoint(path)
        saved = TrainConfig.from_dict(state["config"])
        check_continuable(path, saved, state["epoch"], self.config)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if saved == self.config or not self.config.scheduler.per_batch:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            continue_on_curve(self.scheduler, state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for key in ("epoch", "best_score", "best_epoch", "bad_epochs", "best_weights", "history"):
            setattr(self, key, state[key])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def load_newest(
        self, paths: Iterable[str | os.PathLike], say: Callable[[str], None] = print
    ) -> Path | None:
        """Restore the first readable checkpoint of `paths` (newest first) and return its path.

        Each unreadable one is skipped with a line through `say` (so a damaged file is read
        once, never resumed from); when none can be read, the state stays fresh, saying so.
        `paths` may be lazy (a generator that downloads each candidate when it is reached).
        """
        damaged = 0
        for path in paths:
            try:
                self.load(path)
            except CheckpointError as error:
                damaged += 1
                say(f"{error}; falling back to an older checkpoint")
                continue
            if damaged:
                say(f"resumed from the older checkpoint {path} (epoch {self.epoch})")
            self.resumed_from = Path(path)
            return self.resumed_from
        if damaged:
            say(f"no readable checkpoint ({damaged} damaged): starting from scratch")
        return None


CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"


@dataclass
class CheckpointFiles:
    """A run's two newest checkpoints in its folder: `checkpoint.pt` and the one before it.

    `existing()` is what `fit(checkpoint=...)` resumes from (newest first); `save` is an
    `on_epoch` step. It keeps the file it replaces as the previous checkpoint, unless that is an
    unreadable one this run fell back past (or started afresh without): that one is replaced.
    """

    folder: Path
    saved: int = 0
    """Checkpoints this process has written."""

    @property
    def latest(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def previous(self) -> Path:
        return self.folder / PREVIOUS_CHECKPOINT

    def existing(self) -> list[Path]:
        return [path for path in (self.latest, self.previous) if path.is_file()]

    def save(self, state: EpochState) -> Path:
        keep = bool(self.saved) or state.resumed_from == self.latest
        self.folder.mkdir(parents=True, exist_ok=True)
        path = state.save(self.latest, previous=self.previous if keep else None)
        self.saved += 1
        return path

    def remove(self) -> None:
        """Delete both (a finished run's result supersedes them)."""
        for path in (self.latest, self.previous):
            path.unlink(missing_ok=True)


def ended_for_good(history: list[dict[str, Any]]) -> str:
    """Why the run of `history` ended beyond reopening ('' when more epochs may continue it):
    a run that used up its epochs can be extended, one that early stopping ended cannot."""
    last = history[-1] if history else {}
    if last.get(keys.FINISHED) and last[keys.STOP_REASON] != "max_epochs":
        return last[keys.STOP_REASON]
    return ""


def check_continuable(
    path: str | os.PathLike, saved: TrainConfig, epochs_run: int, config: TrainConfig
) -> None:
    """Refuse (`ConfigError`) to continue a checkpoint of `saved` after `epochs_run` epochs as
    `config`, unless the two differ at most in `max_epochs` and that still covers the epochs run.

    `max_epochs` alone may change because nothing trained so far depends on it but a per-batch
    schedule's length, which `continue_on_curve` carries over: more epochs extend a run, even a
    finished one. Any other change would make the checkpoint's weights those of another run.
    """
    differing = differing_fields(saved.to_dict(), config.to_dict()) - {"max_epochs"}
    if differing:
        raise ConfigError(
            f"checkpoint {path} was written by a run with another config "
            f"(it differs in {', '.join(sorted(differing))})"
        )
    if config.max_epochs < epochs_run:
        raise ConfigError(
            f"max_epochs {config.max_epochs} is fewer than the {epochs_run} epochs "
            f"checkpoint {path} has already run"
        )


UNCOMPARED = frozenset(f.name for f in fields(TrainConfig) if not f.compare)
"""The `TrainConfig` fields its equality ignores (`provenance`); see `differing_fields`."""


def differing_fields(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted names of the leaves where two configs' dicts differ (`optim.lr`), at any depth
    (a plan that holds configs too).

    A config's `provenance` is skipped, as `TrainConfig`'s equality skips it (`UNCOMPARED`): it
    says where the config came from, nothing a run trains on, and an export of the same trial
    again (a new time stamp and code version) must not stop a final or a comparison from
    continuing its runs."""
    names = set()
    for key in (a.keys() | b.keys()) - UNCOMPARED:
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            names |= differing_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            names.add(f"{prefix}{key}")
    return names


CHECKPOINT_KEYS = (
    "config",
    "model",
    "optimizer",
    "scheduler",
    "ema",
    "epoch",
    "best_score",
    "best_epoch",
    "bad_epochs",
    "best_weights",
    "history",
    "rng",
)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict a checkpoint file holds; `CheckpointError` naming the file when it is missing,
    truncated, corrupt or lacks a field `EpochState.load` needs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError...
        if isinstance(error, pickle.UnpicklingError):
            reason = "not a checkpoint written by torch.save"  # torch's message suggests unsafe
        else:
            reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason})") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def _rng_states() -> dict[str, Any]:
    """torch's generators (numpy randomness comes from per-epoch seeded Generators, not globals)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states
