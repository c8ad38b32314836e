"""Where the runs of one Ray-task stage keep their checkpoints and results, so a rerun continues.

`search.final` (folds, rerank runs) and `search.compare` train many runs as Ray tasks, hours of
them on a CPU or spot GPU nodes. A `RunStore` is one folder per stage:

    plan.json                what the runs are (configs, data checksum, folds, seeds): a rerun
                             of another plan is refused, naming what differs
    <NN>-<run name>/checkpoint.pt, checkpoint.prev.pt
                             a running task's two newest epochs, written by the task
    <NN>-<run name>/result.pt
                             a finished run's result, written by the driver as it arrives

A rerun of the same command loads the finished runs' results instead of training them again
and continues the others from their last checkpoint (`train_runs` does both). On a cluster the
tasks write checkpoints on the node they run on, so a lost node's epochs survive only where the
store is on a folder every node mounts; finished results are always on the driver.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marsseg.errors import CheckpointError, ConfigError, first_line
from marsseg.fileio import atomic_path
from marsseg.train.state import CheckpointFiles, differing_fields

PLAN = "plan.json"
RESULT = "result.pt"
_ARRAYS = "__numpy__"
"""Result keys whose numpy arrays were stored as tensors (`weights_only` loads no numpy)."""


@dataclass(frozen=True)
class RunStore:
    """One stage's runs on disk; see the module docstring for the layout."""

    root: Path

    def open(self, plan: Mapping[str, Any], *, force: bool = False) -> list[str]:
        """Start the store for `plan`, or continue the one already there; returns the names of
        the runs already finished.

        A store of another plan is refused in one line naming the fields that differ;
        `force` deletes it and starts over.
        """
        plan = json.loads(json.dumps(plan))  # tuples as lists: what a reread plan holds
        path = self.root / PLAN
        if path.is_file() and force:
            shutil.rmtree(self.root)
        elif path.is_file():
            saved = self._read_plan(path)
            differing = differing_fields(saved, plan)
            if differing:
                raise ConfigError(
                    f"{self.root} holds runs of another plan (it differs in "
                    f"{', '.join(sorted(differing))}); rerun with the same settings to continue "
                    "them, or pass --force to start over"
                )
            return sorted(p.parent.name for p in self.root.glob(f"*/{RESULT}"))
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp:
            temp.write_text(json.dumps(plan, indent=2, sort_keys=True))
        return []

    @staticmethod
    def _read_plan(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} cannot be read ({first_line(err)}); pass --force") from None

    def folder(self, index: int, name: str) -> Path:
        """The folder of the `index`-th run, `<NN>-<name>` with the name made path-safe (the
        index keeps two names that clean to the same text apart)."""
        return self.root / f"{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-')}"

    def checkpoints(self, index: int, name: str) -> CheckpointFiles:
        return CheckpointFiles(self.folder(index, name))

    def save_result(self, index: int, name: str, result: Mapping[str, Any]) -> None:
        """Keep a finished run's result (tensors, numpy arrays and plain data) and drop its
        checkpoints, which it supersedes."""
        arrays = [key for key, value in result.items() if isinstance(value, np.ndarray)]
        stored = {k: torch.from_numpy(v.copy()) if k in arrays else v for k, v in result.items()}
        folder = self.folder(index, name)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / RESULT) as temp:
            torch.save({**stored, _ARRAYS: arrays}, temp)
        self.checkpoints(index, name).remove()

    def result(self, index: int, name: str) -> dict[str, Any] | None:
        """A finished run's result as it was saved, or None when the run has not finished."""
        path = self.folder(index, name) / RESULT
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a damaged file
            raise CheckpointError(
                f"result {path} cannot be read ({first_line(err)}); delete it to train that "
                "run again, or pass --force to start over"
            ) from err
        arrays = stored.pop(_ARRAYS)
        return {k: v.numpy() if k in arrays else v for k, v in stored.items()}

    def discard_if_empty(self) -> None:
        """Remove the store when no run has saved anything yet (a start that failed at once)."""
        if self.root.is_dir() and not any(p.is_file() for p in self.root.glob("*/*")):
            shutil.rmtree(self.root, ignore_errors=True)
