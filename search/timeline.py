"""Where a search's time goes: a Tune callback that records when each trial started, reported
and ended, and the summary of what share of the device time went to Ray rather than training.

Why in the search itself: Ray's overhead (starting a trial's actor, shipping each epoch's result
and checkpoint to the driver, the driver's bookkeeping) is invisible in the trials' own
metrics, and on a GPU where an epoch takes seconds it can rival the training. The callback
runs on the driver and stamps every event with the driver's clock; each result carries its
epoch's training + validation time (`epoch_time_s`, measured in the trial), so what lies
between two results beyond that epoch is overhead. It rewrites `timeline.csv` in the driver
folder as events arrive (at most every `WRITE_EVERY_S`, and whenever a trial ends) and at the
end of the experiment (also after an interruption), each time in one step; `read_timeline` and
`summarise_timeline` turn it into the figures `search.run` prints and the benchmarks tabulate.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from marsseg.fileio import atomic_path
from marsseg.train.keys import EPOCH, EPOCH_TIME_S
from search.experiment import TIMELINE
from search.results import OBJECTIVE

COLUMNS = (
    "session",
    "event",
    "trial",
    "t_s",
    "epoch",
    "epoch_time_s",
    "setup_s",
    "report_prep_s",
    "score",
    "slots",
)
"""One row per event. `event`: begin / end (of a session: one per `Tuner.fit`, a resume adds
one; `slots` = trials it could run at once), start (Tune started the trial's actor, or reused
one), result (an epoch's report arrived), stop (the trial ended: complete, stopped or error).
`t_s`: seconds since the first session began. Result rows carry the trial-side times (see
`search.trainable`) and the epoch's `score` (val mIoU)."""
WRITE_EVERY_S = 5.0
"""How often, at most, a running search rewrites `timeline.csv` (a trial's end always does)."""


class Timeline(Callback):
    """Records the events of a search; stateful, so a resumed experiment keeps its history."""

    def __init__(self, folder: str | Path, slots: int, metric: str = OBJECTIVE) -> None:
        self.folder = Path(folder)
        self.slots = slots
        self.metric = metric
        self.rows: list[dict[str, Any]] = []
        self.origin: float | None = None  # wall-clock time of the first session's begin
        self.session = -1
        self.written = 0.0  # time of the last write

    def _add(self, event: str, trial: str = "", **values: Any) -> None:
        now = time.time()
        if self.origin is None:
            self.origin = now
        row = {"session": self.session, "event": event, "trial": trial, "t_s": now - self.origin}
        self.rows.append(row | values)
        if event in ("stop", "end") or now - self.written >= WRITE_EVERY_S:
            write_timeline(self.rows, self.folder / TIMELINE)
            self.written = now

    def setup(self, **info: Any) -> None:
        self.session += 1
        self._add("begin", slots=self.slots)

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._add("start", trial.trial_id)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self._add(
            "result",
            trial.trial_id,
            epoch=result.get(EPOCH),
            epoch_time_s=result.get(EPOCH_TIME_S),
            setup_s=result.get("setup_s"),
            report_prep_s=result.get("report_prep_s"),
            score=result.get(self.metric),
        )

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._add("stop", trial.trial_id)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._add("stop", trial.trial_id)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._add("end")

    def get_state(self) -> dict[str, Any]:
        return {"rows": self.rows, "origin": self.origin, "session": self.session}

    def set_state(self, state: dict[str, Any]) -> None:
        self.rows, self.origin, self.session = state["rows"], state["origin"], state["session"]


def write_timeline(rows: list[dict[str, Any]], path: Path) -> None:
    """Write `rows` to `path` in one step: a reader sees the old file or the new one."""
    with atomic_path(path) as temp, open(temp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_timeline(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `timeline.csv`, numbers as floats (an empty cell is None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    text = {"event", "trial"}
    return [{k: v if k in text else _number(v) for k, v in row.items()} for row in rows]


def _number(value: str) -> float | None:
    return float(value) if value not in ("", "None", "nan") else None


@dataclass(frozen=True)
class TimelineSummary:
    """What `summarise_timeline` reads from a timeline. Times in seconds; shares of the
    allotted time."""

    trials: int
    epochs: int
    slots: int
    wall_s: float
    """Search wall time, summed over sessions."""
    allotted_s: float
    """Device-slot time: concurrent slots x wall time, per session."""
    train_s: float
    """Sum of the epochs' training + validation time."""
    start_latency_s: list[float]
    """Per trial start: Tune start -> first result, less that epoch's time."""
    setup_s: list[float]
    """The trial-side part of it: the trial function's own preparation (data, model)."""
    report_overhead_s: list[float]
    """Per later epoch: gap between consecutive results, less the epoch's time."""
    report_prep_s: list[float]
    """The trial-side part of it: the TensorBoard panel and checkpoint written before reporting."""

    @property
    def idle_share(self) -> float:
        """Share of the allotted time in which no trial was training."""
        return 1 - self.train_s / self.allotted_s if self.allotted_s else math.nan

    @property
    def start_share(self) -> float:
        return sum(self.start_latency_s) / self.allotted_s if self.allotted_s else math.nan

    @property
    def report_share(self) -> float:
        return sum(self.report_overhead_s) / self.allotted_s if self.allotted_s else math.nan

    @property
    def between_share(self) -> float:
        """The rest of the idle time: slots with no trial (actor creation, the search's tail)."""
        return self.idle_share - self.start_share - self.report_share

    def line(self) -> str:
        """The one-line summary `search.run` prints."""
        return (
            f"timeline: {self.trials} trials, {self.epochs} epochs in {self.wall_s:.0f} s on "
            f"{self.slots} slot(s); trial start {_median(self.start_latency_s):.2f} s median "
            f"(trial setup {_median(self.setup_s):.2f} s), report+checkpoint "
            f"{_median(self.report_overhead_s):.2f} s/epoch median; slots idle "
            f"{self.idle_share:.1%} (starts {self.start_share:.1%}, reports "
            f"{self.report_share:.1%}, between trials {self.between_share:.1%})"
        )

    def row(self) -> dict[str, Any]:
        """The figures as one flat row for a benchmark table (shares in percent)."""
        return {
            "trials": self.trials,
            "epochs": self.epochs,
            "slots": self.slots,
            "wall_s": self.wall_s,
            "train_s": self.train_s,
            "start_median_s": _median(self.start_latency_s),
            "start_max_s": max(self.start_latency_s, default=math.nan),
            "setup_median_s": _median(self.setup_s),
            "report_median_s": _median(self.report_overhead_s),
            "report_prep_median_s": _median(self.report_prep_s),
            "idle_pct": 100 * self.idle_share,
            "start_pct": 100 * self.start_share,
            "report_pct": 100 * self.report_share,
            "between_pct": 100 * self.between_share,
        }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarise_timeline(rows: list[dict[str, Any]]) -> TimelineSummary:
    """Start latency, per-epoch report overhead and idle share of a timeline's rows.

    A trial's results are paired with the start that precedes them (a trial retried or resumed
    starts again), so each run of a trial has one start latency and its later epochs one gap
    each. Results are assumed in arrival order, as the callback writes them.
    """
    sessions: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        sessions.setdefault(row["session"], []).append(row)
    tally = _Tally()
    for events in sessions.values():
        tally.add_session(events)
    return TimelineSummary(
        trials=len(tally.trials),
        epochs=tally.epochs,
        slots=tally.slots,
        wall_s=tally.wall,
        allotted_s=tally.allotted,
        train_s=tally.train,
        start_latency_s=tally.starts,
        setup_s=tally.setups,
        report_overhead_s=tally.gaps,
        report_prep_s=tally.preps,
    )


@dataclass
class _Tally:
    """What `summarise_timeline` adds up over the sessions of a timeline."""

    wall: float = 0.0
    allotted: float = 0.0
    train: float = 0.0
    slots: int = 0
    epochs: int = 0
    trials: set[str] = field(default_factory=set)
    starts: list[float] = field(default_factory=list)
    setups: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    preps: list[float] = field(default_factory=list)

    def add_session(self, events: list[dict[str, Any]]) -> None:
        begin = next((r for r in events if r["event"] == "begin"), events[0])
        session_wall = events[-1]["t_s"] - begin["t_s"]
        self.slots = int(begin.get("slots") or self.slots or 1)
        self.wall += session_wall
        self.allotted += self.slots * session_wall
        last: dict[str, tuple[str, float]] = {}  # trial -> (previous event, its time)
        for row in events:
            trial = row["trial"]
            if row["event"] == "start":
                last[trial] = ("start", row["t_s"])
            elif row["event"] == "result" and row["epoch_time_s"] is not None:
                self.add_result(row, *last.get(trial, ("", math.nan)))
                last[trial] = ("result", row["t_s"])

    def add_result(self, row: dict[str, Any], previous: str, since: float) -> None:
        self.trials.add(row["trial"])
        self.epochs += 1
        self.train += row["epoch_time_s"]
        lag = row["t_s"] - since - row["epoch_time_s"]
        if previous == "start":
            self.starts.append(lag)
            if row.get("setup_s") is not None:
                self.setups.append(row["setup_s"])
        elif previous == "result":
            self.gaps.append(lag)
            if row.get("report_prep_s") is not None:
                self.preps.append(row["report_prep_s"])


def trial_results(rows: list[dict[str, Any]]) -> list[tuple[float, str, float]]:
    """(time since the first begin, trial, score) of every result with a score, in order."""
    return [
        (r["t_s"], r["trial"], r["score"])
        for r in rows
        if r["event"] == "result" and r["score"] is not None
    ]
