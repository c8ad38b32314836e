"""Reading a finished (or running) experiment: the leaderboard and exported configurations.

Shared by `search.run` (at the end of a search) and `search.export` (any time later), so both
rank trials and write configs the same way.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback, Result, ResultGrid
from ray.tune.experiment import Trial

import marsseg
from marsseg.config import TrainConfig
from marsseg.errors import kind_and_first_line
from marsseg.fileio import atomic_path
from marsseg.report import describe_augment, describe_loss, describe_schedule
from marsseg.train.keys import EPOCH, FINISHED, IOU_KEYS, VAL_MIOU
from search.experiment import LEADERBOARD, Experiment
from spaces import params_to_config

OBJECTIVE = VAL_MIOU
"""What the search maximises, ASHA compares and the leaderboard ranks by."""
LIVE_WRITE_S = 5.0
"""`LiveLeaderboard` rewrites `leaderboard.csv` at most this often while results arrive (and
whenever a trial ends)."""
KEPT_KEYS = (EPOCH, FINISHED, OBJECTIVE, *IOU_KEYS.values(), "time_total_s", "hostname", "node_id")
"""What `LiveLeaderboard` keeps of each result: what `summarise_trial` reads."""


@dataclass(frozen=True)
class TrialSummary:
    """One trial as the leaderboard ranks it: its config and its best epoch's scores."""

    trial_id: str
    config: TrainConfig
    status: str
    """complete (ended by itself), stopped (by ASHA or the time budget) or error."""
    epochs: int
    best_epoch: int
    scores: dict[str, float]
    """val_miou and per-class IoU at the best epoch."""
    time_s: float
    node: str
    """The host of the trial's last epoch."""
    node_ids: tuple[str, ...] = ()
    """The Ray nodes the trial ran on, in order: more than one when it was retried elsewhere
    after its node died (hosts alone cannot tell apart several nodes on one machine)."""


def rank_trials(results: ResultGrid, base: TrainConfig) -> list[TrialSummary]:
    """One summary per trial that reported at least one epoch, best val mIoU first."""
    summaries = []
    for result in results:
        last = result.metrics or {}
        status = "error" if result.error else "complete" if last.get(FINISHED) else "stopped"
        summary = summarise_trial(
            _trial_id(result), result.config, base, result.metrics_dataframe, last, status
        )
        if summary is not None:
            summaries.append(summary)
    return best_first(summaries)


def summarise_trial(
    trial_id: str,
    params: dict[str, Any],
    base: TrainConfig,
    history: pd.DataFrame | None,
    last: dict[str, Any],
    status: str,
) -> TrialSummary | None:
    """A trial's summary from its per-epoch results (None before it reported a score)."""
    if history is None or OBJECTIVE not in history or history[OBJECTIVE].isna().all():
        return None
    best = history.loc[history[OBJECTIVE].idxmax()]
    return TrialSummary(
        trial_id=trial_id,
        config=params_to_config(params, base),
        status=status,
        epochs=int(history[EPOCH].max()),
        best_epoch=int(best[EPOCH]),
        scores={key: float(best[key]) for key in (OBJECTIVE, *IOU_KEYS.values())},
        time_s=float(last.get("time_total_s", 0.0)),
        node=str(last.get("hostname", "")),
        node_ids=_nodes_in_order(history),
    )


def best_first(summaries: list[TrialSummary]) -> list[TrialSummary]:
    return sorted(summaries, key=lambda s: s.scores[OBJECTIVE], reverse=True)


def _trial_id(result: Result) -> str:
    return str((result.metrics or {}).get("trial_id", Path(result.path).name))


@dataclass(frozen=True)
class TrialError:
    """A trial that ended in an error, and that error's kind and first line."""

    trial_id: str
    message: str


def trial_errors(results: ResultGrid) -> list[TrialError]:
    """The trials that errored (after their retries), in Tune's order."""
    return [TrialError(_trial_id(r), kind_and_first_line(r.error)) for r in results if r.error]


def leaderboard(summaries: list[TrialSummary]) -> pd.DataFrame:
    """The leaderboard table: rank, trial, architecture, knobs, loss, augmentation, scores."""
    rows = []
    for rank, s in enumerate(summaries, start=1):
        c = s.config
        rows.append(
            {
                "rank": rank,
                "trial": s.trial_id,
                "arch": c.model.name,
                "knobs": " ".join(f"{k}={_short(v)}" for k, v in c.model.knobs.items()),
                "loss": describe_loss(c),
                "augment": describe_augment(c),
                "oversample": round(c.oversample, 2),
                "lr": c.optim.lr,
                "schedule": describe_schedule(c),
                "batch": c.batch_size,
                "epochs": s.epochs,
                "best_epoch": s.best_epoch,
                **{k: round(v, 4) for k, v in s.scores.items()},
                "status": s.status,
                "time_s": round(s.time_s, 1),
                "node": s.node,
                "node_id": " > ".join(s.node_ids),
            }
        )
    return pd.DataFrame(rows)


def write_leaderboard(summaries: list[TrialSummary], path: Path) -> pd.DataFrame:
    """Write the leaderboard of `summaries` to `path` in one step (a reader never sees half of
    it) and return it."""
    table = leaderboard(summaries)
    with atomic_path(path) as temp:
        table.to_csv(temp, index=False)
    return table


def _nodes_in_order(history: pd.DataFrame) -> tuple[str, ...]:
    """The distinct node ids of a trial's epochs, first seen first (none in older experiments)."""
    if "node_id" not in history:
        return ()
    return tuple(dict.fromkeys(str(n) for n in history["node_id"].dropna()))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def with_provenance(summary: TrialSummary, experiment: Experiment) -> TrainConfig:
    """The trial's config, stamped with where it came from (the data's checksum and, when the
    search saw only the first N images, N: what `search.final` checks its archive against)."""
    data = {k: v for k, v in experiment.base.provenance.items() if k.startswith("data_")}
    return summary.config.replace(
        provenance={
            "experiment": experiment.uri,
            "trial": summary.trial_id,
            "val_miou": round(summary.scores[OBJECTIVE], 6),
            "best_epoch": summary.best_epoch,
            "epochs": summary.epochs,
            "status": summary.status,
            "seed": summary.config.seed,
            **data,
            "code_version": code_version(),
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(marsseg.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return marsseg.__version__
    return f"{marsseg.__version__}+{commit}"


class LiveLeaderboard(Callback):
    """Rewrites the driver folder's `leaderboard.csv` as results arrive (the end of the search
    writes it once more from Tune's results); stateful, so a resumed search keeps the trials
    ranked before the interruption. A trial still training has status `running`."""

    def __init__(self, folder: Path, base: TrainConfig) -> None:
        self.folder = Path(folder)
        self.base = base
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.ended: dict[str, str] = {}  # trial -> "stopped" or "error"
        self.written = 0.0  # time of the last write

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        kept = {key: result[key] for key in KEPT_KEYS if key in result}
        self.history.setdefault(trial.trial_id, []).append(kept)
        self.params[trial.trial_id] = dict(trial.config)
        self.ended.pop(trial.trial_id, None)  # a retried trial runs again
        if time.time() - self.written >= LIVE_WRITE_S:
            self.write()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self.ended[trial.trial_id] = "stopped"
        self.write()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info):
        self.ended[trial.trial_id] = "error"
        self.write()

    def write(self) -> None:
        summaries = []
        for trial_id, rows in self.history.items():
            last = rows[-1]
            status = self.ended.get(trial_id, "running")
            if status == "stopped" and last.get(FINISHED):
                status = "complete"
            params = self.params[trial_id]
            summary = summarise_trial(trial_id, params, self.base, pd.DataFrame(rows), last, status)
            if summary is not None:
                summaries.append(summary)
        if summaries:
            write_leaderboard(best_first(summaries), self.folder / LEADERBOARD)
        self.written = time.time()

    def get_state(self) -> dict[str, Any]:
        return {"history": self.history, "params": self.params, "ended": self.ended}

    def set_state(self, state: dict[str, Any]) -> None:
        self.history, self.params, self.ended = state["history"], state["params"], state["ended"]
