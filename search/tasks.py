"""Trainings as Ray tasks, for the stages that retrain outside Tune: compare, final (folds, rerank).

Each task asks for `--cpus-per-trial` CPUs (its torch threads; 1 when not given) and
`--gpus-per-trial` GPUs; Ray queues the tasks that do not fit, so a one-core machine runs them one
after another and a cluster (`--address auto`) spreads them over its nodes. Each epoch of each
task prints one line on the driver, labelled by its run (`fold 2/5  epoch   3/20 ...`), as it
ends. A task that raises does not stop the others: `as_completed` hands back its reason in its
place, and `Failures` names them all at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.remote_function import RemoteFunction
from tqdm import tqdm

from marsseg.cli import add_cpus_flag, torch_threads
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.errors import MarsSegError
from marsseg.train import EpochState, fit, prepare_data
from marsseg.train.keys import EPOCH, EPOCH_TIME_S, SCORE_KEYS
from marsseg.train.progress import epoch_line
from search.capacity import AUTOSCALER_CONFIG, capacity, check_trial_resources, connect

SCORES = list(SCORE_KEYS)
TASK_CPUS = 1.0
"""CPUs of a task when `--cpus-per-trial` is not given."""
POLL_S = 1.0
"""How often the driver prints the epoch lines that arrived while it waits for a task to end."""

K = TypeVar("K", bound=Hashable)


class TaskError(MarsSegError):
    """Ray tasks that raised: the message names each one and why."""


def add_resource_flags(
    parser: argparse.ArgumentParser, what: str = "run", cpus_help: str | None = None
) -> None:
    """`--cpus-per-trial` (also `--threads`), `--gpus-per-trial` and `--address`, as every Ray
    stage spells them."""
    add_cpus_flag(parser, cpus_help or f"CPUs per {what}, its torch threads (default: 1)")
    add = parser.add_argument
    add("--gpus-per-trial", type=float, help=f"GPUs per {what}; 0.25 packs 4 (default: 1 if any)")
    add("--address", help="Ray address: 'auto' joins a cluster (default: a local Ray)")


def task_cpus(cpus: float | None) -> float:
    """CPUs each task asks for: `--cpus-per-trial`, or `TASK_CPUS` when it was not given."""
    return TASK_CPUS if cpus is None else cpus


def start_ray(address: str | None, cpus: float, gpus: float | None) -> float:
    """Connect, check that one task fits on a node, and return the GPUs each task asks for
    (1 when the cluster has any and none was asked for)."""
    connect(address)
    cap = capacity(AUTOSCALER_CONFIG if address else None)
    gpus = gpus if gpus is not None else (1.0 if cap.gpus else 0.0)
    check_trial_resources(cap, cpus, gpus)
    return gpus


def training_only(archive: MarsArchive) -> MarsArchive:
    """The archive without its test set: what a training task needs in the object store."""
    return dataclasses.replace(archive, test_images=None)


@ray.remote(num_cpus=0)
class EpochLog:
    """The epoch lines of running tasks, held until the driver prints them.

    A task's own prints reach the driver through Ray's log deduplication, which holds back or
    folds lines that differ only in their numbers: just what epoch lines are. Lines sent here
    arrive whole, and the driver prints them in the order they came.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


@dataclass(frozen=True)
class EpochReporter:
    """`fit`'s `on_epoch` inside a task: each epoch's line goes to the driver's `EpochLog`.

    It waits for the log to take the line, so every epoch line of a task is there before the
    driver learns that the task ended.
    """

    log: ActorHandle
    label: str
    max_epochs: int

    def __call__(self, metrics: dict[str, Any], _state: EpochState | None = None) -> None:
        ray.get(self.log.add.remote(epoch_line(metrics, self.max_epochs, self.label)))


def train_one(
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
    workers: int = 0,
    on_epoch: EpochReporter | None = None,
) -> dict[str, Any]:
    """One config with one seed: its scores at its best epoch (the weights it would keep)."""
    start = time.perf_counter()
    data = prepare_data(config, archive, split=split)
    result = fit(config, data, num_threads=threads, workers=workers, on_epoch=on_epoch)
    best = next(row for row in result.history if row[EPOCH] == result.best_epoch)
    return {
        **{key: best[key] for key in SCORES},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_s": sum(row[EPOCH_TIME_S] for row in result.history),
        "wall_s": time.perf_counter() - start,
    }


train_run = ray.remote(train_one)


@dataclass(frozen=True, eq=False)
class Run:
    """One training task of `train_runs`: the name its progress lines and messages carry, its
    config (seed and epoch budget included) and its (train, val) split."""

    name: str
    config: TrainConfig
    split: tuple[np.ndarray, np.ndarray]


def train_runs(
    runs: Mapping[K, Run],
    archive: MarsArchive,
    *,
    cpus: float,
    gpus: float,
    workers: int = 0,
    desc: str = "runs",
    task: RemoteFunction | None = None,
    **options: Any,
) -> Iterator[tuple[K, Any, str | None]]:
    """Every run as a Ray task at once (Ray queues what does not fit), with its epoch lines
    printed as they come; then as `as_completed`, by the runs' keys.

    `task` (default `train_run`) is called as `task(config, archive, split, threads=,
    workers=, on_epoch=, **options)`; `search.final` passes its fold task this way.
    """
    remote = (task or train_run).options(num_cpus=cpus, num_gpus=gpus)
    data = ray.put(training_only(archive))  # one copy in the object store for every run
    threads = torch_threads(cpus)
    log = EpochLog.remote()
    jobs = {
        key: remote.remote(
            run.config,
            data,
            run.split,
            threads=threads,
            workers=workers,
            on_epoch=EpochReporter(log, run.name, run.config.max_epochs),
            **options,
        )
        for key, run in runs.items()
    }
    yield from as_completed(jobs, desc, log=log)


def as_completed(
    jobs: Mapping[K, ray.ObjectRef], desc: str = "runs", log: ActorHandle | None = None
) -> Iterator[tuple[K, Any, str | None]]:
    """(key, result, None), or (key, None, reason) for a task that raised, in the order the
    tasks end: the caller reports each as it comes and keeps going past a failure.

    The lines the tasks sent to `log` (an `EpochLog`) are printed while waiting, and a task's
    last ones before its result. A progress bar counts the tasks on a terminal (not in a log);
    print beside it with `tqdm.write`.
    """
    pending = {ref: key for key, ref in jobs.items()}
    with tqdm(total=len(pending), desc=desc, unit="run", disable=None) as bar:
        while pending:
            timeout = None if log is None else POLL_S
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if log is not None:
                for line in ray.get(log.take.remote()):
                    tqdm.write(line)
            if not done:
                continue
            key = pending.pop(done[0])
            try:
                result, reason = ray.get(done[0]), None
            except ray.exceptions.RayError as err:
                result, reason = None, failure_reason(err)
            yield key, result, reason
            bar.update()


def failure_reason(err: BaseException) -> str:
    """`ValueError: first line of its message`: the exception the task raised, not Ray's wrapper."""
    cause = getattr(err, "cause", None)
    shown = cause if isinstance(cause, BaseException) else err
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0]}" if lines else type(shown).__name__


@dataclass
class Failures:
    """The runs that failed, each named with its reason as it comes (the others go on), and
    all of them at the end in one `TaskError`."""

    lines: list[str] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.lines.append(f"{name} failed: {reason}")
        tqdm.write(self.lines[-1])

    def __bool__(self) -> bool:
        return bool(self.lines)

    def check(self, note: str = "") -> None:
        """Raise a `TaskError` naming every failure (then `note`, in brackets), if any."""
        if self.lines:
            raise TaskError("; ".join(self.lines) + (f" ({note})" if note else ""))
