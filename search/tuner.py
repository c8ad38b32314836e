"""The `Tuner` of a search: everything about scheduling lives in this one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from marsseg.data import MarsArchive
from marsseg.errors import ConfigError
from marsseg.train.keys import EPOCH, VAL_MIOU_BEST
from search.asha import ASHA_STATE, ResumableASHA
from search.experiment import SAMPLERS, SCHEDULERS, Experiment
from search.optuna_searcher import PruningOptunaSearch, close_stopped_trials
from search.results import OBJECTIVE, LiveLeaderboard
from search.timeline import Timeline
from search.trainable import train_trial
from spaces import SearchSpace

MAX_FAILURES = 3
"""Retries of a crashed trial (from its last checkpoint) before it counts as failed."""


@dataclass(frozen=True)
class TrialResources:
    """What each trial of this run gets: this run's choice, also when it resumes a search.
    `cpus` and `gpus` as `search.capacity.start_ray` settled and checked them."""

    cpus: float = 1
    gpus: float = 0
    checkpoint_every: int = 1
    """A checkpoint every N epochs and the last; a retried trial redoes up to N-1 epochs."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every must be >= 1")


def _trainable(
    experiment: Experiment, archive: MarsArchive, resources: TrialResources
) -> tune.Trainable:
    """The trainable with the data in the object store (put there once, not per trial)."""
    workers = max(0, int(resources.cpus) - 1)  # CPUs beyond the first feed online augmentation
    with_data = tune.with_parameters(
        train_trial,
        archive=archive,
        base=experiment.base.to_dict(),
        workers=workers,
        checkpoint_every=resources.checkpoint_every,
    )
    return tune.with_resources(with_data, {"cpu": resources.cpus, "gpu": resources.gpus})


class TrialStarts(Callback):
    """Counts the trials Tune started in this run (for `search.run`: did the search start?)."""

    def __init__(self) -> None:
        self.count = 0

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self.count += 1


def new_tuner(
    experiment: Experiment,
    space: SearchSpace,
    archive: MarsArchive,
    resources: TrialResources,
    callbacks: Sequence[Callback] = (),
) -> tune.Tuner:
    """A new search of `experiment` (its settings say how) over `space`.

    A finished trial's actor (its process, imports and CUDA context) runs the next trial unless
    `no_reuse_actors` (see `benchmarks/ray_overhead.py`). Besides `callbacks`, the timeline and
    the live leaderboard record the search in the driver folder as it runs."""
    settings = experiment.settings
    recorders = [
        Timeline(experiment.driver, slots=settings.max_concurrent or 1),
        LiveLeaderboard(experiment.driver, experiment.base),
    ]
    return tune.Tuner(
        _trainable(experiment, archive, resources),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(experiment, space),
            scheduler=_scheduler(experiment),
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent,
            time_budget_s=settings.time_budget,
            reuse_actors=not settings.no_reuse_actors,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=experiment.storage.path,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=OBJECTIVE,
                checkpoint_score_order="max",
            ),
            # The trials' own files (TensorBoard image panels) live in their working folders on
            # whichever node ran them; this uploads them beside the checkpoints.
            sync_config=tune.SyncConfig(sync_artifacts=True),
            callbacks=[*recorders, *callbacks],
            verbose=1,
        ),
    )


def restore_tuner(
    experiment: Experiment, archive: MarsArchive, resources: TrialResources
) -> tune.Tuner:
    """Continue an interrupted experiment: finished trials stay, unfinished ones resume.

    The searcher, scheduler and timeline come back from the experiment (ASHA's rungs from its
    state file); the trainable is built anew, so the resources are this run's choice."""
    return tune.Tuner.restore(
        experiment.uri,
        trainable=_trainable(experiment, archive, resources),
        resume_errored=True,
    )


def close_study(experiment: Experiment) -> list[int]:
    """After a search that ended, not one interrupted: the trials its end stopped (a spent
    `--time-budget`) are told to the study as PRUNED, or FAIL if they reported nothing, instead
    of staying RUNNING in it for good (`close_stopped_trials`). Returns their Optuna numbers."""
    return close_stopped_trials(experiment.name, experiment.study_url)


def _searcher(experiment: Experiment, space: SearchSpace) -> PruningOptunaSearch:
    settings = experiment.settings
    points = [] if settings.no_reference_trial else space.points_to_evaluate
    experiment.driver.mkdir(parents=True, exist_ok=True)  # SQLite creates no folder
    return PruningOptunaSearch(
        space=space.space,
        metric=OBJECTIVE,
        mode="max",
        objective_key=VAL_MIOU_BEST,
        points_to_evaluate=points or None,
        sampler=_sampler(settings.sampler, settings.seed),
        study_name=experiment.name,
        storage=experiment.study_url,
        on_save=experiment.syncer(),
    )


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")


def _scheduler(experiment: Experiment) -> TrialScheduler:
    settings = experiment.settings
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.scheduler == "asha":
        return ResumableASHA(
            time_attr=EPOCH,
            metric=OBJECTIVE,
            mode="max",
            max_t=settings.max_epochs,
            grace_period=min(settings.grace_period, settings.max_epochs),
            reduction_factor=settings.reduction_factor,
            state_path=experiment.driver / ASHA_STATE,
        )
    raise ConfigError(f"unknown scheduler {settings.scheduler!r}; known: {', '.join(SCHEDULERS)}")


def _trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folder names (Tune's default packs every parameter into the name)."""
    return f"{trial.trainable_name}_{trial.trial_id}"
