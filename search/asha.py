"""Asynchronous successive halving whose rungs survive an interrupted and resumed search.

Ray Tune leaves the trial scheduler out of its experiment checkpoint: `Tuner.restore` unpickles
the scheduler from `tuner.pkl` as it was when the search began, so Ray's `ASHAScheduler` resumes
with empty rungs and stops fewer trials than the search it continues. `ResumableASHA` makes the
same decisions as `ASHAScheduler(brackets=1, stop_last_trials=True)` and keeps its rungs in a
JSON file that a resumed search reads back.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

ASHA_STATE = "asha_state.json"
"""The state file's name, for the search to put beside the experiment's other driver files."""

_FORMAT = 1


class ResumableASHA(FIFOScheduler):
    """ASHA with one bracket whose recorded values per rung are kept in `state_path`.

    Rungs sit at `grace_period * reduction_factor**k` (as many as Ray's bracket 0 has). When a
    trial's `time_attr` first reaches a rung, the trial is stopped if its value is below the
    rung's cutoff, the (1 - 1/reduction_factor) quantile of the values recorded there before it
    (nan-aware; no cutoff while the rung is empty), and its value is then recorded; a trial
    reaching `max_t` is stopped. A trial resumed from an older checkpoint re-reports epochs it
    has already recorded: those are not counted again (values are keyed by trial id), and a
    trial this scheduler stopped is stopped again if it reports at all (Tune may have lost the
    stop when the driver died between the decision and its next experiment checkpoint).

    The state is written atomically whenever it changes and read back lazily on first use, so a
    copy unpickled from `tuner.pkl` on resume picks it up. `state_path=None` keeps it in memory.
    """

    def __init__(
        self,
        *,
        time_attr: str,
        metric: str | None,
        mode: str | None,
        max_t: float,
        grace_period: float,
        reduction_factor: float,
        state_path: str | os.PathLike[str] | None,
    ):
        if not max_t > 0:
            raise ValueError(f"max_t must be positive, got {max_t}")
        if not 0 < grace_period <= max_t:
            raise ValueError(f"grace_period must be in (0, max_t], got {grace_period}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        super().__init__()
        self._time_attr = time_attr
        self._objective = metric
        self._mode = mode
        self._max_t = max_t
        self._rf = reduction_factor
        # The same expression as Ray's _Bracket (bracket s=0), so that the float rounding of
        # log(max_t / grace_period) / log(rf) gives the same number of rungs.
        n_rungs = int(np.log(max_t / grace_period) / np.log(reduction_factor) - 0 + 1)
        self._milestones = [grace_period * reduction_factor**k for k in reversed(range(n_rungs))]
        self._state_path = None if state_path is None else Path(state_path)
        self._reset()

    def _reset(self) -> None:
        # Highest milestone first, as Ray orders its rungs; values as reported (not sign-flipped).
        self._rungs: list[dict[str, float]] = [{} for _ in self._milestones]
        self._stopped: dict[str, float] = {}  # trial id -> the milestone it was stopped at
        self._num_stopped = 0
        self._loaded = self._state_path is None

    def __getstate__(self) -> dict[str, Any]:
        """With a state file, a pickled copy carries no rungs: it reads the file when first used
        (the file, not `tuner.pkl`, is what is current when a search resumes)."""
        state = self.__dict__.copy()
        if self._state_path is not None:
            state.update(
                _rungs=[{} for _ in self._milestones], _stopped={}, _num_stopped=0, _loaded=False
            )
        return state

    @property
    def metric(self) -> str | None:
        return self._objective

    @property
    def milestones(self) -> list[float]:
        """The rungs' values of `time_attr`, lowest first."""
        return self._milestones[::-1]

    def recorded(self) -> dict[float, dict[str, float]]:
        """Milestone -> {trial id: value recorded there}, lowest milestone first."""
        self._ensure_loaded()
        return {m: dict(r) for m, r in zip(self._milestones[::-1], self._rungs[::-1], strict=True)}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._objective and metric) or (self._mode and mode):
            return False
        if metric:
            self._objective = metric
        if mode:
            if mode not in ("min", "max"):
                raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
            self._mode = mode
        if self._objective is None and self._mode:
            self._objective = DEFAULT_METRIC
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._objective or not self._mode:
            raise ValueError(
                f"{type(self).__name__} has no metric ({self._objective}) or mode ({self._mode}):"
                " pass them to it or to tune.TuneConfig()"
            )
        self._ensure_loaded()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._ensure_loaded()
        if self._time_attr not in result or self._objective not in result:
            return TrialScheduler.CONTINUE
        t = result[self._time_attr]
        if t >= self._max_t:
            self._num_stopped += 1
            return TrialScheduler.STOP
        if trial.trial_id in self._stopped:
            self._num_stopped += 1
            return TrialScheduler.STOP
        action, milestone = self._on_result(trial.trial_id, t, result[self._objective])
        if action == TrialScheduler.STOP:
            self._stopped[trial.trial_id] = milestone
            self._num_stopped += 1
        if milestone is not None:
            self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        """Records the last result as Ray does (its decision is moot: the trial has ended)."""
        self._ensure_loaded()
        if self._time_attr not in result or self._objective not in result:
            return
        _, milestone = self._on_result(
            trial.trial_id, result[self._time_attr], result[self._objective]
        )
        if milestone is not None:
            self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        pass

    def debug_string(self) -> str:
        self._ensure_loaded()
        rungs = " | ".join(
            f"{self._time_attr} {m:g}: cutoff {self._cutoff(r)} ({len(r)} recorded)"
            for m, r in zip(self._milestones, self._rungs, strict=True)
        )
        return f"Using ResumableASHA: num_stopped={self._num_stopped}\nRungs: {rungs}"

    def _sign(self) -> float:
        return 1.0 if self._mode == "max" else -1.0

    def _cutoff(self, recorded: dict[str, float]) -> float | None:
        if not recorded:
            return None
        signed = [self._sign() * v for v in recorded.values()]
        with warnings.catch_warnings():  # a rung of nans has a nan cutoff, which stops nothing
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanpercentile(signed, (1 - 1 / self._rf) * 100))

    def _on_result(self, trial_id: str, t: float, value: float) -> tuple[str, float | None]:
        """Ray's rule: the highest rung that `t` has reached and the trial has not recorded at
        decides (against the values recorded there before this one) and then records it."""
        for milestone, recorded in zip(self._milestones, self._rungs, strict=True):
            if t < milestone or trial_id in recorded:
                continue
            cutoff = self._cutoff(recorded)
            stop = cutoff is not None and self._sign() * value < cutoff
            recorded[trial_id] = float(value)
            return (TrialScheduler.STOP if stop else TrialScheduler.CONTINUE), milestone
        return TrialScheduler.CONTINUE, None

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        assert self._state_path is not None
        if not self._state_path.exists():
            return
        state = json.loads(self._state_path.read_text())
        milestones = [rung["milestone"] for rung in state["rungs"]]
        if state.get("format") != _FORMAT or not _same(milestones, self._milestones):
            raise ValueError(
                f"{self._state_path} holds rungs at {milestones}, not this scheduler's"
                f" {self._milestones}: it belongs to another search"
            )
        self._rungs = [{k: float(v) for k, v in r["recorded"].items()} for r in state["rungs"]]
        self._stopped = {k: float(v) for k, v in state["stopped"].items()}

    def _save(self) -> None:
        if self._state_path is None:
            return
        state = {
            "format": _FORMAT,
            "time_attr": self._time_attr,
            "metric": self._objective,
            "mode": self._mode,
            "rungs": [
                {"milestone": m, "recorded": r}
                for m, r in zip(self._milestones, self._rungs, strict=True)
            ],
            "stopped": self._stopped,
        }
        folder = self._state_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        # nan values are written as NaN, which Python's json reads back.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self._state_path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y) for x, y in zip(a, b, strict=True))
