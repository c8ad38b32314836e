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
from ray.tune import ResultGrid

import marsseg
from marsseg.config import TrainConfig
from marsseg.report import describe_augment, describe_loss, describe_schedule
from marsseg.train.keys import EPOCH, FINISHED, IOU_KEYS, VAL_MIOU
from search.experiment import Experiment
from spaces import params_to_config

OBJECTIVE = VAL_MIOU
"""What the search maximises, ASHA compares and the leaderboard ranks by."""


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
        history = result.metrics_dataframe
        if history is None or OBJECTIVE not in history or history[OBJECTIVE].isna().all():
            continue
        best = history.loc[history[OBJECTIVE].idxmax()]
        last = result.metrics or {}
        status = "error" if result.error else "complete" if last.get(FINISHED) else "stopped"
        summaries.append(
            TrialSummary(
                trial_id=str(last.get("trial_id", Path(result.path).name)),
                config=params_to_config(result.config, base),
                status=status,
                epochs=int(history[EPOCH].max()),
                best_epoch=int(best[EPOCH]),
                scores={key: float(best[key]) for key in (OBJECTIVE, *IOU_KEYS.values())},
                time_s=float(last.get("time_total_s", 0.0)),
                node=str(last.get("hostname", "")),
                node_ids=_nodes_in_order(history),
            )
        )
    return sorted(summaries, key=lambda s: s.scores[OBJECTIVE], reverse=True)


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
