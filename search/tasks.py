"""Trainings as Ray tasks, for the stages that retrain outside Tune: compare, final (folds, rerank).

Each task asks for the CPUs (its torch threads) and GPUs `search.capacity.start_ray` settled
from `--cpus-per-trial` and `--gpus-per-trial`, and holds them while it runs (it never blocks on
Ray, which would lend them to a queued task); Ray queues the tasks that do not fit, so a
one-core machine runs them one after another and a cluster (`--address auto`) spreads them over
its nodes. Each epoch of each task prints one line on the driver, labelled by its run
(`fold 2/5  epoch   3/20 ...`), as it ends. With a `RunStore` each task checkpoints every epoch
and a rerun continues where it stopped. A task that raises does not stop the others:
`as_completed` hands back its reason in its place, and `Failures` names them all at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import ray
from ray.actor import ActorHandle
from tqdm import tqdm

from marsseg.cli import GPUS, add_cpus_flag, torch_threads
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.errors import MarsSegError, kind_and_first_line
from marsseg.train import EpochState, FitResult, PreparedData, fit, prepare_data
from marsseg.train.keys import EPOCH, EPOCH_TIME_S, SCORE_KEYS
from marsseg.train.loop import OnEpoch
from marsseg.train.progress import epoch_line
from marsseg.train.state import CheckpointFiles
from search.runstore import RunStore

SCORES = list(SCORE_KEYS)
POLL_S = 1.0
"""How often the driver prints the epoch lines that arrived while it waits for a task to end."""
LINES_WAIT_S = 10.0
"""How long the driver waits for a finished task's last epoch lines (sent, not yet arrived)."""

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
    add("--gpus-per-trial", type=GPUS, help=f"GPUs per {what}; 0.25 packs 4 (default: 1 if any)")
    add("--address", help="Ray address: 'auto' joins a cluster (default: a local Ray)")


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
        self.lines: list[tuple[str, int, str]] = []

    def add(self, label: str, epoch: int, line: str) -> None:
        self.lines.append((label, epoch, line))

    def take(self) -> list[tuple[str, int, str]]:
        lines, self.lines = self.lines, []
        return lines


class EpochLines:
    """The driver's side of an `EpochLog`: prints the lines that have arrived, and waits for a
    finished task's last ones, so every epoch line of a run comes before the line of its end."""

    def __init__(self) -> None:
        self.log = EpochLog.remote()
        self.printed: dict[str, int] = {}

    def flush(self) -> None:
        for label, epoch, line in ray.get(self.log.take.remote()):
            tqdm.write(line)
            self.printed[label] = max(epoch, self.printed.get(label, 0))

    def wait_for(self, label: str, epoch: int) -> None:
        """Print lines until `label`'s epoch `epoch` is among them (or `LINES_WAIT_S` passed)."""
        deadline = time.monotonic() + LINES_WAIT_S
        self.flush()
        while self.printed.get(label, 0) < epoch and time.monotonic() < deadline:
            time.sleep(0.05)
            self.flush()


@dataclass
class EpochReporter:
    """`fit`'s `on_epoch` inside a task: the epoch's checkpoint first (with a `CheckpointFiles`),
    then its line to the driver's `EpochLog`.

    The line is sent without waiting for it: a task that blocks in `ray.get` lends its CPU to
    the next queued task, which would then train beside it on a core it does not have. Ray runs
    one caller's calls to an actor in order, and the task reports the last epoch it sent
    (`last_epoch`) with its result, so the driver can wait for that line (`EpochLines`).
    """

    log: ActorHandle
    label: str
    max_epochs: int
    checkpoints: CheckpointFiles | None = None
    last_epoch: int = 0

    def __call__(self, metrics: dict[str, Any], state: EpochState | None = None) -> None:
        if self.checkpoints is not None and state is not None:
            self.checkpoints.save(state)
        epoch = metrics[EPOCH]
        self.log.add.remote(self.label, epoch, epoch_line(metrics, self.max_epochs, self.label))
        self.last_epoch = epoch


def fit_split(
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
    workers: int = 0,
    on_epoch: OnEpoch | None = None,
    checkpoint: Sequence[Path] | None = None,
) -> tuple[PreparedData, FitResult]:
    """`config` trained on the (train, val) `split` of `archive`, continued from `checkpoint`
    (newest first) when given: what every task stage's run does, before what it keeps."""
    data = prepare_data(config, archive, split=split)
    result = fit(
        config,
        data,
        num_threads=threads,
        workers=workers,
        on_epoch=on_epoch,
        checkpoint=checkpoint or None,
    )
    return data, result


def train_one(
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    *,
    threads: int,
    workers: int = 0,
    on_epoch: OnEpoch | None = None,
    checkpoint: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """One config with one seed: its scores at its best epoch (the weights it would keep)."""
    start = time.perf_counter()
    _, result = fit_split(config, archive, split, threads, workers, on_epoch, checkpoint)
    best = next(row for row in result.history if row[EPOCH] == result.best_epoch)
    return {
        **{key: best[key] for key in SCORES},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_s": sum(row[EPOCH_TIME_S] for row in result.history),
        "wall_s": time.perf_counter() - start,
    }


@ray.remote
def run_task(
    fn: Callable[..., Any],
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    *,
    label: str,
    log: ActorHandle,
    folder: Path | None,
    **kwargs: Any,
) -> tuple[Any, str, int]:
    """`fn(config, archive, split, on_epoch=, checkpoint=, **kwargs)` as a Ray task, continued
    from the checkpoints in `folder` (None: none kept); returns its result, its label and the
    last epoch whose line it sent. Ray retries a task whose worker died, from the checkpoint."""
    checkpoints = CheckpointFiles(folder) if folder is not None else None
    reporter = EpochReporter(log, label, config.max_epochs, checkpoints)
    resume = checkpoints.existing() if checkpoints is not None else []
    result = fn(config, archive, split, on_epoch=reporter, checkpoint=resume or None, **kwargs)
    return result, label, reporter.last_epoch


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
    task: Callable[..., Any] | None = None,
    store: RunStore | None = None,
    **options: Any,
) -> Iterator[tuple[K, Any, str | None]]:
    """Every run as a Ray task at once (Ray queues what does not fit), with its epoch lines
    printed as they come; then as `as_completed`, by the runs' keys.

    `task` (default `train_one`) is called in the task as `task(config, archive, split,
    threads=, workers=, on_epoch=, checkpoint=, **options)`; `search.final` passes its fold
    task this way. With a `store` (opened for these runs), a run it holds a result of is not
    trained again (its result comes first, from the store), the others continue from the
    checkpoints they keep there, and each result is saved there as it arrives.
    """
    task = task or train_one
    index = {key: i for i, key in enumerate(runs)}
    kept, todo = {}, {}
    for key, run in runs.items():
        result = store.result(index[key], run.name) if store is not None else None
        if result is None:
            todo[key] = run
        else:
            kept[key] = result
    for key, result in kept.items():
        tqdm.write(f"{runs[key].name}: finished earlier, kept from {store.root}")
        yield key, result, None
    if not todo:
        return
    remote = run_task.options(num_cpus=cpus, num_gpus=gpus)
    data = ray.put(training_only(archive))  # one copy in the object store for every run
    threads = torch_threads(cpus)
    lines = EpochLines()
    jobs = {
        key: remote.remote(
            task,
            run.config,
            data,
            run.split,
            label=run.name,
            log=lines.log,
            folder=store.folder(index[key], run.name) if store is not None else None,
            threads=threads,
            workers=workers,
            **options,
        )
        for key, run in todo.items()
    }
    for key, result, reason in as_completed(jobs, desc, lines):
        if store is not None and reason is None:
            store.save_result(index[key], runs[key].name, result)
        yield key, result, reason


def as_completed(
    jobs: Mapping[K, ray.ObjectRef], desc: str = "runs", lines: EpochLines | None = None
) -> Iterator[tuple[K, Any, str | None]]:
    """(key, result, None), or (key, None, reason) for a task that raised, in the order the
    `run_task` jobs end: the caller reports each as it comes and keeps going past a failure.

    The epoch lines (`lines`) are printed while waiting, and a task's last ones before its
    result. A progress bar counts the tasks on a terminal (not in a log); print beside it with
    `tqdm.write`.
    """
    pending = {ref: key for key, ref in jobs.items()}
    with tqdm(total=len(pending), desc=desc, unit="run", disable=None) as bar:
        while pending:
            timeout = None if lines is None else POLL_S
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if lines is not None:
                lines.flush()
            if not done:
                continue
            key = pending.pop(done[0])
            try:
                (result, label, last_epoch), reason = ray.get(done[0]), None
            except ray.exceptions.RayError as err:
                result, reason = None, kind_and_first_line(err)
            else:
                if lines is not None:
                    lines.wait_for(label, last_epoch)
            yield key, result, reason
            bar.update()


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
