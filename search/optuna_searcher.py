"""A Ray Tune searcher driving Optuna, made multi-fidelity aware for use with ASHA.

Stock `ray.tune.search.optuna.OptunaSearch` tells Optuna COMPLETE, with the last reported score,
for every trial that ends without an error, including trials that ASHA stopped after one or two
epochs. TPE then ranks a 2-epoch score against 40-epoch scores as if both were final, which pulls
the search towards configurations that learn fast early rather than ones that end up best.

`PruningOptunaSearch` fixes that: a trial stopped by the scheduler reaches Optuna as PRUNED, with
one intermediate value per reported epoch (TPE ranks PRUNED trials by how far they got and their
last intermediate value), and only a trial whose trainable ended on its own (its final report
carries ``finished: True``) is COMPLETE. It also keeps the study in a persistent Optuna storage
(SQLite in the experiment folder), so optuna-dashboard can watch it and `Tuner.restore` continues
the same study without duplicated or lost trials.

It is written on public interfaces only: Ray's `Searcher` (not a subclass of OptunaSearch, whose
private attributes the previous version had to override), and Optuna's ask/tell API plus the
public `BaseStorage` methods. Nothing here reads a private attribute of a Ray or Optuna object,
so a minor release of either cannot silently break a resume.
"""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.sample import Domain

logger = logging.getLogger(__name__)

SpaceFn = Callable[[optuna.Trial], dict[str, Any] | None]
Space = SpaceFn | dict[str, BaseDistribution]

STATE_VERSION = 1
"""Format of the dict that `PruningOptunaSearch.save` pickles; bumped when its keys change."""


def sqlite_url(path: str | Path) -> str:
    """Return the Optuna storage URL of an SQLite file at `path`, creating its folder.

    Why: SQLAlchemy needs four slashes for an absolute path (``sqlite:////abs/optuna.db``), a
    relative URL silently resolves against whatever the working directory is when the experiment
    is resumed, and SQLite cannot create the file if its folder does not exist yet (the searcher
    is built before Tune creates the experiment folder).
    """
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def close_stopped_trials(study_name: str, storage: str | BaseStorage) -> list[int]:
    """Tell the study the end of the trials it still holds RUNNING, after Tune's run ended.

    Why: when a stopper ends the whole experiment (``time_budget_s``, any ``stop_all``), Tune
    stops its running and pending trials without calling ``Searcher.on_trial_complete`` (Ray
    2.60, ``TuneController._stop_experiment_if_needed``), so their Optuna trials would stay
    RUNNING for good: optuna-dashboard shows them running, and nothing ever resumes them. Each
    gets the state `PruningOptunaSearch.on_trial_complete` gives a trial stopped from outside:
    PRUNED if it reported an epoch (its values are in the study already, since every result
    Tune processes reaches ``on_trial_result``), FAIL if it reported none.

    Call it only after a run that ended: an interrupted run's RUNNING trials are the ones a
    resume continues. Returns the numbers of the trials it told, in order.
    """
    study = optuna.load_study(study_name=study_name, storage=storage)
    told = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=_outside_stop_state(bool(trial.intermediate_values)))
        told.append(trial.number)
    return told


def _outside_stop_state(reported: bool) -> TrialState:
    """The state of a trial stopped from outside (a scheduler, a stopper): PRUNED with what it
    reported, FAIL if it reported nothing, since TPE ranks a PRUNED trial without intermediate
    values as the worst one seen (evidence against a configuration never evaluated), while it
    ignores FAIL."""
    return TrialState.PRUNED if reported else TrialState.FAIL


def _check_space(space: Any) -> Space | None:
    if space is None or callable(space):
        return space
    if isinstance(space, Mapping) and all(isinstance(d, BaseDistribution) for d in space.values()):
        return dict(space)
    raise TypeError(
        "PruningOptunaSearch takes a define-by-run function `space(trial) -> dict | None` or a "
        f"dict of Optuna distributions as its space, not {type(space).__name__}."
    )


def _has_search_domains(config: Any) -> bool:
    """Whether a Tune config holds anything left to sample (Tune domains, Optuna distributions,
    grid searches), at any depth."""
    if isinstance(config, Domain | BaseDistribution):
        return True
    if isinstance(config, Mapping):
        return "grid_search" in config or any(_has_search_domains(v) for v in config.values())
    if isinstance(config, list | tuple):
        return any(_has_search_domains(v) for v in config)
    return False


class PruningOptunaSearch(Searcher):
    """Optuna search that tells scheduler-stopped trials as PRUNED and persists its study.

    Args:
        space: A define-by-run function ``space(trial) -> dict | None`` (module-level, so that
            Tune can pickle it into ``tuner.pkl`` by reference); the dict it returns holds
            constants merged into every suggested config. A dict of Optuna distributions also
            works.
        metric: Result key reported to Optuna as the intermediate value of every epoch (one
            objective only: Optuna's intermediate values and TPE's ranking of PRUNED trials are
            single-objective).
        mode: ``"min"`` or ``"max"``.
        objective_key: Result key whose value (in the final result) becomes the objective of a
            COMPLETE trial, e.g. ``"val_miou_best"``; defaults to `metric`.
        points_to_evaluate: Configurations enqueued in the study, run first in this order.
            Enqueued at most once per study, so re-creating the searcher for a resume does not
            queue them again.
        sampler: An Optuna sampler; defaults to ``TPESampler(seed=seed)``.
        seed: Seed of the default TPE sampler (ignored, with a warning, if `sampler` is given).
        study_name: Name of the study in `storage`; an existing study of that name is continued.
        storage: An Optuna storage URL (``sqlite_url(experiment_dir / "optuna.db")``, opened as
            an ``RDBStorage``) or storage object; None keeps the study in memory (and then
            entirely in Tune's searcher checkpoint).
        on_save: Called after every `save` (picklable: it travels in ``tuner.pkl``). Tune saves
            the searcher with each experiment checkpoint, so a copy of the study made here
            (uploaded beside the experiment, say) is never older than the checkpoint that a
            resume reconciles it with.

    The trainable must report, in every result, `metric` and the epoch under ``"epoch"`` (else
    ``training_iteration`` is used as the step), and put ``"finished": True`` in the result of
    the epoch after which it stops by itself (max epochs reached or its own early stopping).
    Pass `metric` and `mode` here, not only to ``TuneConfig``: Tune offers those to
    `set_search_properties` only when the Tuner has a ``param_space``.

    Public accessors: `study` (the Optuna study), `optuna_trial(trial_id)` (the stored Optuna
    trial behind a Tune trial), `objective_key`, `metric`, `mode`, and `saved_sampler(path)` to
    read the sampler out of a checkpoint written by `save`.
    """

    # The result contract of marsseg's training loop; class attributes, not more constructor
    # arguments, since they change with the trainable, not with the experiment.
    STEP_KEY = "epoch"
    FINISHED_KEY = "finished"

    def __init__(
        self,
        space: Space | None = None,
        metric: str | None = None,
        mode: str | None = None,
        *,
        objective_key: str | None = None,
        points_to_evaluate: list[dict[str, Any]] | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        seed: int | None = None,
        study_name: str | None = None,
        storage: str | BaseStorage | None = None,
        on_save: Callable[[], None] | None = None,
    ) -> None:
        if isinstance(metric, list | tuple) or isinstance(mode, list | tuple):
            raise ValueError(
                "PruningOptunaSearch is single-objective: Optuna cannot report intermediate "
                "values or rank PRUNED trials for several objectives."
            )
        super().__init__(metric=metric, mode=mode)  # Validates them, and tags Ray's usage stats.
        # Ray's Searcher keeps metric and mode in attributes private to it; these are this
        # class's own, returned by the public `metric` and `mode` properties overridden below,
        # so that `set_search_properties` and `set_state` can set them.
        self._search_metric = metric
        self._search_mode = mode
        self._space = _check_space(space)
        self._objective_key = objective_key
        points = list(points_to_evaluate or [])
        if not all(isinstance(point, Mapping) for point in points):
            raise TypeError("points_to_evaluate must be a list of dicts of parameter values.")
        self._points = [dict(point) for point in points]
        if sampler is not None and seed is not None:
            logger.warning("PruningOptunaSearch: `seed` is ignored when a `sampler` is given.")
        self._sampler = sampler if sampler is not None else optuna.samplers.TPESampler(seed=seed)
        self._study_name = study_name
        self._on_save = on_save
        if storage is None:
            storage = InMemoryStorage()
        elif isinstance(storage, str):
            storage = RDBStorage(storage)
        # Built here, not by Optuna from a URL, so that the searcher holds the storage object
        # and can use its public methods (see `_report`).
        self._storage: BaseStorage = storage
        self._study: optuna.Study | None = None
        # Tune trial id -> Optuna trial number; kept after the trial is told.
        self._trials: dict[str, int] = {}
        # Tune trials told to Optuna (COMPLETE, PRUNED or FAIL): nothing more reaches Optuna.
        self._told: set[str] = set()
        # Tune trial id -> steps already reported to Optuna (see `on_trial_result`).
        self._reported: dict[str, set[int]] = {}
        if self._space is not None and self._search_mode:
            self._open_study()  # Now, so that the points are in the study before Tune starts.

    # --- Public accessors ------------------------------------------------------------------

    @property
    def metric(self) -> str | None:
        """Result key reported to Optuna as every epoch's intermediate value."""
        return self._search_metric

    @property
    def mode(self) -> str | None:
        """``"min"`` or ``"max"``: the direction of the study."""
        return self._search_mode

    @property
    def objective_key(self) -> str:
        """Result key of the objective of COMPLETE trials."""
        return self._objective_key or self.metric

    @property
    def study(self) -> optuna.Study:
        """The Optuna study the searcher asks and tells (opened on first use).

        For reading trials; asking or telling through it behind the searcher's back would make
        the searcher's trial bookkeeping wrong.
        """
        if self._study is None:
            if self._space is None or not self._search_mode:
                raise RuntimeError(
                    "PruningOptunaSearch has no study yet: it needs a space and a mode, from its "
                    "constructor or from Tune's set_search_properties."
                )
            self._open_study()
        return self._study

    def optuna_trial(self, trial_id: str) -> FrozenTrial:
        """A copy of the Optuna trial behind Tune trial `trial_id`, as stored now.

        Raises KeyError for a trial this searcher did not suggest.
        """
        return copy.deepcopy(
            self._storage.get_trial(self._storage_trial_id(self._trials[trial_id]))
        )

    @staticmethod
    def saved_sampler(checkpoint_path: str | Path) -> optuna.samplers.BaseSampler:
        """The sampler in a checkpoint written by `save` (its ``"sampler"`` key)."""
        with open(checkpoint_path, "rb") as f:
            return pickle.load(f)["sampler"]

    # --- Tune's Searcher interface --------------------------------------------------------

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        """Take Tune's metric and mode where none were given; a config only as the space.

        As Ray's contract asks, returns False, changing nothing, when the searcher cannot take
        them: a metric or mode that conflicts with the one it has (or several of them), or a
        `config` holding search domains when the searcher already has a space (Tune then
        raises for the unresolved values). A `config` of Optuna distributions becomes the
        space of a searcher built without one; Tune domains are not converted.
        """
        if isinstance(metric, list | tuple) or isinstance(mode, list | tuple):
            return False
        if mode and mode not in ("min", "max"):
            return False
        if (metric and self._search_metric and metric != self._search_metric) or (
            mode and self._search_mode and mode != self._search_mode
        ):
            return False
        space = self._space
        if config and _has_search_domains(config):
            if space is not None:
                return False
            try:
                space = _check_space(config)
            except TypeError:
                return False
        if space is None:
            return False
        self._space = space
        self._search_metric = self._search_metric or metric
        self._search_mode = self._search_mode or mode
        if self._study is None and self._search_mode:
            self._open_study()
        return True

    def suggest(self, trial_id: str) -> dict[str, Any]:
        """Ask Optuna for a trial and return its config: the parameters the space sampled (or
        an enqueued point fixed) plus the constants the space function returns."""
        if self._space is None or not self._search_metric or not self._search_mode:
            raise RuntimeError(
                "PruningOptunaSearch needs a space, a metric and a mode before it can suggest: "
                "pass them to its constructor or through Tune's set_search_properties."
            )
        study = self.study
        if callable(self._space):
            trial = study.ask()
            try:
                constants = self._space(trial)
                if constants is not None and not isinstance(constants, dict):
                    raise TypeError(
                        "The define-by-run space must return None or a dict of constants, "
                        f"not {type(constants).__name__}."
                    )
            except BaseException:
                study.tell(trial.number, state=TrialState.FAIL)  # Else RUNNING forever.
                raise
        else:
            trial = study.ask(fixed_distributions=self._space)
            constants = None
        self._trials[trial_id] = trial.number
        return {**trial.params, **(constants or {})}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record `metric` as an intermediate value of the Optuna trial at step = the epoch.

        Tune does not call this for the result on which the scheduler decides STOP; that one
        arrives with ``on_trial_complete``, which records it through here. Repeated steps (a
        trial restarted from an earlier checkpoint after a failure or a resume) are skipped:
        Optuna would keep the first value of a step anyway, and warn. Results of trials told
        already are ignored: after a resume the study may know a trial's end before Tune does.
        """
        if trial_id in self._told:
            return
        number = self._trials.get(trial_id)
        if number is None:
            logger.warning(
                "Result for trial %s, which this searcher did not suggest (a trial restarted "
                "under a new id?); Optuna will not see it.",
                trial_id,
            )
            return
        value = result.get(self.metric)
        step = result.get(self.STEP_KEY, result.get(TRAINING_ITERATION))
        if value is None or step is None:
            return
        steps = self._reported.setdefault(trial_id, set())
        if int(step) in steps:
            return
        self._report(number, int(step), float(value))
        steps.add(int(step))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Tell Optuna COMPLETE only for trials that ended on their own, else PRUNED or FAIL.

        - error: FAIL;
        - last result has a truthy ``finished``: COMPLETE with ``result[objective_key]`` (FAIL
          if that key is missing: a COMPLETE trial without its objective would be a lie);
        - any other result: PRUNED (the scheduler stopped it). Its last result is recorded as
          an intermediate value first, because Tune does not pass the result that triggered a
          scheduler stop to ``on_trial_result``;
        - no result at all (stopped before its first report): FAIL, not PRUNED (see
          `_outside_stop_state`).

        A trial is told once; later completions, and those of unknown trials, are ignored.
        """
        if trial_id in self._told or trial_id not in self._trials:
            logger.debug("Ignoring completion of trial %s: told already or unknown.", trial_id)
            return
        if result:
            self.on_trial_result(trial_id, result)
        number = self._trials[trial_id]
        if error:
            self.study.tell(number, state=TrialState.FAIL)
        elif result and result.get(self.FINISHED_KEY):
            objective = result.get(self.objective_key)
            if objective is None:
                logger.error(
                    "Trial %s finished without %r in its last result; telling Optuna FAIL.",
                    trial_id,
                    self.objective_key,
                )
                self.study.tell(number, state=TrialState.FAIL)
            else:
                self.study.tell(number, values=float(objective))
        else:
            self.study.tell(number, state=_outside_stop_state(bool(result)))
        self._told.add(trial_id)
        self._reported.pop(trial_id, None)

    # --- Checkpoints ------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """The searcher's state as a plain dict; `save` pickles it. Keys:

        - ``"version"``: the format, `STATE_VERSION`;
        - ``"study_name"``, ``"metric"``, ``"mode"``, ``"objective_key"``: what the study is;
        - ``"sampler"``: the sampler object itself, so a resumed TPE continues its random
          stream instead of re-seeding and proposing its first configurations again;
        - ``"trials"``: Tune trial id -> Optuna trial number, for every suggested trial;
        - ``"told"``: the Tune trial ids already told to Optuna;
        - ``"storage"``: the storage itself when it lives in memory (the checkpoint is then
          the only copy of the study), else None.

        Why no study with a persistent storage: the database keeps being written after the
        checkpoint, so a pickled copy of the study would be stale at once; `set_state` reads
        the study back from the storage instead.
        """
        return {
            "version": STATE_VERSION,
            "study_name": self._study_name,
            "metric": self._search_metric,
            "mode": self._search_mode,
            "objective_key": self._objective_key,
            "sampler": self._sampler,
            "trials": dict(self._trials),
            "told": sorted(self._told),
            "storage": self._storage if isinstance(self._storage, InMemoryStorage) else None,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Take a state from `get_state`, then reconcile it with the study in the storage.

        Why: Tune restores the searcher state of its last experiment checkpoint, taken together
        with the trial list it resumes, but the database kept being written until the
        interruption. The database is trusted for what it knows, the checkpoint for which
        trials Tune will resume:

        - a checkpointed trial the database shows finished keeps that record; Tune re-running
          it reports nothing more to Optuna (a finished Optuna trial cannot be re-opened, and a
          second Optuna trial would duplicate it);
        - a checkpointed unfinished trial is re-attached, its reported steps read back, so that
          re-reported epochs are skipped;
        - a RUNNING trial the checkpoint does not know was asked after it: Tune will never run
          it, so it is told FAIL (ignored by TPE), and if it was an enqueued point its
          parameters are enqueued again so the point is not lost.

        The space and the points to evaluate are the constructor's, not the checkpoint's.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Searcher checkpoint of format {state.get('version')!r}, expected "
                f"{STATE_VERSION}: written by another version of PruningOptunaSearch."
            )
        if state["storage"] is not None:
            self._storage = state["storage"]
        self._study_name = state["study_name"]
        self._search_metric = state["metric"]
        self._search_mode = state["mode"]
        self._objective_key = state["objective_key"]
        self._sampler = state["sampler"]
        self._trials = dict(state["trials"])
        self._told = set(state["told"])
        self._reported = {}
        self._study = None
        if self._study_name is None:
            return  # Saved before a study was set up: nothing to reconcile.
        self._study = optuna.load_study(
            study_name=self._study_name,
            storage=self._storage,
            sampler=self._sampler,
            pruner=optuna.pruners.NopPruner(),
        )
        self._reconcile()

    def save(self, checkpoint_path: str) -> None:
        """Pickle `get_state()` (a plain dict) to `checkpoint_path`."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)
        if self._on_save is not None:
            self._on_save()

    def restore(self, checkpoint_path: str) -> None:
        """Load a checkpoint written by `save` and reconcile it with the storage (`set_state`)."""
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (e.g. into Tune's ``tuner.pkl``) without the study handle, which is reopened
        from the storage on first use."""
        state = self.__dict__.copy()
        state["_study"] = None
        return state

    # --- Internals --------------------------------------------------------------------------

    def _open_study(self) -> None:
        """Create the study, or load it if it exists, then enqueue the points not yet there.

        ``enqueue_trial(skip_if_exists=True)`` makes this idempotent: a searcher is built again
        for the same study whenever an experiment is resumed, and the points must not be
        queued (and trained) twice.
        """
        study = optuna.create_study(
            storage=self._storage,
            sampler=self._sampler,
            pruner=optuna.pruners.NopPruner(),  # Tune's scheduler decides what stops.
            study_name=self._study_name,
            direction="maximize" if self._search_mode == "max" else "minimize",
            load_if_exists=True,
        )
        for point in self._points:
            study.enqueue_trial(point, skip_if_exists=True)
        self._study_name = study.study_name
        self._study = study

    def _storage_trial_id(self, number: int) -> int:
        study_id = self._storage.get_study_id_from_name(self.study.study_name)
        return self._storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def _report(self, number: int, step: int, value: float) -> None:
        """Record an intermediate value of Optuna trial `number` through the storage.

        Why the storage, not ``optuna.Trial.report``: after a restore the searcher holds no
        ``optuna.Trial`` for the trials it re-attaches, and Optuna's docs forbid building one
        by hand. ``BaseStorage.set_trial_intermediate_value`` is public and is what
        ``Trial.report`` calls; using it for every trial keeps one path before and after a
        restore. Optuna's cached RDB storage re-reads unfinished trials from the database, so
        the study sees these values when the trial is told.
        """
        self._storage.set_trial_intermediate_value(self._storage_trial_id(number), step, value)

    def _reconcile(self) -> None:
        """See `set_state`."""
        study = self.study
        stored = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
        unknown = {tid: n for tid, n in self._trials.items() if n not in stored}
        if unknown:
            raise RuntimeError(
                f"Study {self._study_name!r} lacks the Optuna trials {sorted(unknown.values())} "
                "of the searcher checkpoint: is this the experiment's storage?"
            )
        attached: set[int] = set()
        for trial_id, number in self._trials.items():
            trial = stored[number]
            if trial.state.is_finished():
                self._told.add(trial_id)
            elif trial_id not in self._told:
                self._reported[trial_id] = set(trial.intermediate_values)
                attached.add(number)
        for trial in stored.values():
            if trial.state == TrialState.RUNNING and trial.number not in attached:
                logger.info("Optuna trial %d was lost with the interruption: FAIL.", trial.number)
                study.tell(trial.number, state=TrialState.FAIL)
                if "fixed_params" in trial.system_attrs:
                    study.enqueue_trial(trial.system_attrs["fixed_params"])
