"""The `Tuner` of a search: everything about scheduling lives in this one call."""

from __future__ import annotations

from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.errors import ConfigError
from search.optuna_searcher import PruningOptunaSearch, sqlite_url
from search.results import OBJECTIVE
from search.timeline import Timeline
from search.trainable import train_trial
from spaces import SearchSpace

MAX_FAILURES = 3
"""Retries of a crashed trial (from its last checkpoint) before it counts as failed."""
STUDY_FILE = "optuna.db"
SAMPLERS = ("tpe", "random")
"""Optuna samplers a search can use; random is the baseline the search-efficiency benchmark
compares TPE against, on the same define-by-run space."""
SCHEDULERS = ("asha", "fifo")
"""Trial schedulers: ASHA stops poor trials early, fifo runs every trial to its end."""


def driver_folder(experiment: str) -> Path:
    """Where the driver keeps the study and reports: the experiment folder itself when it is
    local, else a folder of the same name under ./experiments (SQLite cannot live on S3)."""
    if "://" not in experiment:
        return Path(experiment)
    return Path("experiments").resolve() / experiment.rstrip("/").rsplit("/", 1)[-1]


def _trainable(
    archive: MarsArchive,
    base: TrainConfig,
    cpus_per_trial: float,
    gpus_per_trial: float,
    checkpoint_every: int,
) -> tune.Trainable:
    """The trainable with the data in the object store (put there once, not per trial)."""
    workers = max(0, int(cpus_per_trial) - 1)  # CPUs beyond the first feed online augmentation
    with_data = tune.with_parameters(
        train_trial,
        archive=archive,
        base=base.to_dict(),
        workers=workers,
        checkpoint_every=checkpoint_every,
    )
    return tune.with_resources(with_data, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})


def make_tuner(
    *,
    space: SearchSpace,
    archive: MarsArchive,
    base: TrainConfig,
    name: str,
    storage: str,
    experiment: str,
    num_samples: int,
    max_epochs: int,
    grace_period: int,
    reduction_factor: float,
    cpus_per_trial: float,
    gpus_per_trial: float,
    max_concurrent: int,
    seed: int,
    time_budget: float | None,
    sampler: str = "tpe",
    scheduler: str = "asha",
    reference_trial: bool = True,
    checkpoint_every: int = 1,
    reuse_actors: bool = True,
) -> tune.Tuner:
    """A new search. `reference_trial=False` leaves out the space's starting points;
    `reuse_actors` lets a finished trial's actor (its process, imports and CUDA context) run the
    next trial instead of a new one being started (see `benchmarks/ray_overhead.py`)."""
    points = space.points_to_evaluate if reference_trial else []
    searcher = PruningOptunaSearch(
        space=space.space,
        metric=OBJECTIVE,
        mode="max",
        objective_key="val_miou_best",
        points_to_evaluate=points or None,
        sampler=_sampler(sampler, seed),
        study_name=name,
        storage=sqlite_url(driver_folder(experiment) / STUDY_FILE),
    )
    return tune.Tuner(
        _trainable(archive, base, cpus_per_trial, gpus_per_trial, checkpoint_every),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(scheduler, max_epochs, grace_period, reduction_factor),
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            time_budget_s=time_budget,
            reuse_actors=reuse_actors,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=OBJECTIVE,
                checkpoint_score_order="max",
            ),
            # The trials' own files (TensorBoard image panels) live in their working folders on
            # whichever node ran them; this uploads them beside the checkpoints.
            sync_config=tune.SyncConfig(sync_artifacts=True),
            callbacks=[Timeline(driver_folder(experiment), slots=max_concurrent)],
            verbose=1,
        ),
    )


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")


def _scheduler(
    name: str, max_epochs: int, grace_period: int, reduction_factor: float
) -> TrialScheduler:
    if name == "fifo":
        return FIFOScheduler()
    if name == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            metric=OBJECTIVE,
            mode="max",
            max_t=max_epochs,
            grace_period=min(grace_period, max_epochs),
            reduction_factor=reduction_factor,
        )
    raise ConfigError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")


def _trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folder names (Tune's default packs every parameter into the name)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def restore_tuner(
    experiment: str,
    archive: MarsArchive,
    base: TrainConfig,
    cpus_per_trial: float,
    gpus_per_trial: float,
    checkpoint_every: int = 1,
) -> tune.Tuner:
    """Continue an interrupted experiment: finished trials stay, unfinished ones resume.

    The searcher, scheduler and timeline come back from the experiment; the trainable is
    built anew, so `checkpoint_every` is this run's choice."""
    return tune.Tuner.restore(
        experiment,
        trainable=_trainable(archive, base, cpus_per_trial, gpus_per_trial, checkpoint_every),
        resume_errored=True,
    )
