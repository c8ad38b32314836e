"""Trainings as Ray tasks, for the stages that retrain outside Tune: compare, final (folds, rerank).

Each task asks for `--cpus-per-trial` CPUs (its torch threads) and `--gpus-per-trial` GPUs; Ray
queues the tasks that do not fit, so a one-core machine runs them one after another and a
cluster (`--address auto`) spreads them over its nodes. A task that raises does not stop the
others: `as_completed` hands back its reason in its place, for the caller to name at the end.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import ray
from tqdm import tqdm

from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.errors import MarsSegError
from marsseg.train import fit, prepare_data
from marsseg.train.keys import EPOCH, EPOCH_TIME_S, SCORE_KEYS
from search.capacity import AUTOSCALER_CONFIG, capacity, check_trial_resources, connect

SCORES = list(SCORE_KEYS)

K = TypeVar("K", bound=Hashable)


class TaskError(MarsSegError):
    """Ray tasks that raised: the message names each one and why."""


def add_resource_flags(parser: argparse.ArgumentParser, what: str = "run") -> None:
    """`--cpus-per-trial`, `--gpus-per-trial` and `--address`, as every Ray stage spells them."""
    add = parser.add_argument
    add("--cpus-per-trial", type=float, default=1, help=f"CPUs per {what} (torch threads)")
    add("--gpus-per-trial", type=float, help=f"GPUs per {what}; 0.25 packs 4 (default: 1 if any)")
    add("--address", help="Ray address: 'auto' joins a cluster (default: a local Ray)")


def start_ray(address: str | None, cpus: float, gpus: float | None) -> float:
    """Connect, check that one task fits on a node, and return the GPUs each task asks for
    (1 when the cluster has any and none was asked for)."""
    connect(address)
    cap = capacity(AUTOSCALER_CONFIG if address else None)
    gpus = gpus if gpus is not None else (1.0 if cap.gpus else 0.0)
    check_trial_resources(cap, cpus, gpus)
    return gpus


def task_threads(cpus: float) -> int:
    """Torch threads of a task granted `cpus` CPUs (a fraction still gets one)."""
    return max(1, int(cpus))


@ray.remote
def train_run(
    config: TrainConfig,
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
    workers: int = 0,
) -> dict[str, Any]:
    """One config with one seed: its scores at its best epoch (the weights it would keep)."""
    start = time.perf_counter()
    data = prepare_data(config, archive, split=split)
    result = fit(config, data, num_threads=threads, workers=workers)
    best = next(row for row in result.history if row[EPOCH] == result.best_epoch)
    return {
        **{key: best[key] for key in SCORES},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_s": sum(row[EPOCH_TIME_S] for row in result.history),
        "wall_s": time.perf_counter() - start,
    }


def as_completed(
    jobs: Mapping[K, ray.ObjectRef], desc: str = "runs"
) -> Iterator[tuple[K, Any, str | None]]:
    """(key, result, None), or (key, None, reason) for a task that raised, in the order the
    tasks end: the caller reports each as it comes and keeps going past a failure.

    A progress bar counts them on a terminal (not in a log); print beside it with `tqdm.write`.
    """
    pending = {ref: key for key, ref in jobs.items()}
    with tqdm(total=len(pending), desc=desc, unit="run", disable=None) as bar:
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done)
            try:
                result, reason = ray.get(done), None
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
