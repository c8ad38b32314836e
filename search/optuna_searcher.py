"""Ray Tune's OptunaSearch, made multi-fidelity aware for use with a trial scheduler (ASHA).

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
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import validate_warmstart

logger = logging.getLogger(__name__)

SpaceFn = Callable[[optuna.Trial], dict[str, Any] | None]


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


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells scheduler-stopped trials as PRUNED and persists its study.

    Args:
        space: The search space, as for OptunaSearch; typically a module-level define-by-run
            function ``space(trial) -> dict | None`` (module-level, so that Tune can pickle it
            into ``tuner.pkl`` by reference).
        metric: Result key reported to Optuna as the intermediate value of every epoch (one
            objective only: Optuna's ``Trial.report`` and TPE's ranking of PRUNED trials are
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
        storage: An Optuna storage URL (``sqlite_url(experiment_dir / "optuna.db")``) or storage
            object; None keeps the study in memory (and then entirely in Tune's searcher
            checkpoint, as OptunaSearch does).

    The trainable must report, in every result, `metric` and the epoch under ``"epoch"`` (else
    ``training_iteration`` is used as the step), and put ``"finished": True`` in the result of
    the epoch after which it stops by itself (max epochs reached or its own early stopping).
    Pass `metric` and `mode` here, not only to ``TuneConfig``: OptunaSearch built with a space
    ignores the ones Tune offers in ``set_search_properties``.
    """

    # The result contract of marsseg's training loop; class attributes, not more constructor
    # arguments, since they change with the trainable, not with the experiment.
    STEP_KEY = "epoch"
    FINISHED_KEY = "finished"

    def __init__(
        self,
        space: SpaceFn | dict[str, Any] | None = None,
        metric: str | None = None,
        mode: str | None = None,
        *,
        objective_key: str | None = None,
        points_to_evaluate: list[dict[str, Any]] | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        seed: int | None = None,
        study_name: str | None = None,
        storage: str | BaseStorage | None = None,
    ) -> None:
        if isinstance(metric, list | tuple) or isinstance(mode, list | tuple):
            raise ValueError(
                "PruningOptunaSearch is single-objective: Optuna cannot report intermediate "
                "values or rank PRUNED trials for several objectives."
            )
        self._objective_key = objective_key
        # trial_id -> steps already reported to Optuna (see `on_trial_result`).
        self._reported_steps: dict[str, set[int]] = {}
        super().__init__(
            space=space,
            metric=metric,
            mode=mode,
            points_to_evaluate=points_to_evaluate,
            sampler=sampler,
            study_name=study_name,
            storage=RDBStorage(storage) if isinstance(storage, str) else storage,
            seed=seed,
        )

    def _setup_study(self, mode: str | None) -> None:
        """Create (or load) the study, then enqueue `points_to_evaluate` only if not yet there.

        Why: OptunaSearch enqueues every point each time it sets a study up, and with a
        persistent study that happens again whenever a searcher is built for the same study
        (the script constructing one before calling ``Tuner.restore``, or Tune calling
        ``set_search_properties`` on the searcher unpickled from ``tuner.pkl``): each would add
        the points to the queue again and they would be trained twice.
        ``enqueue_trial(skip_if_exists=True)`` makes the enqueue idempotent.
        """
        points, self._points_to_evaluate = self._points_to_evaluate, []
        try:
            super()._setup_study(mode)
        finally:
            self._points_to_evaluate = points
        if points:
            validate_warmstart(
                self._space, points, None, validate_point_name_lengths=not callable(self._space)
            )
            for point in points:
                self._ot_study.enqueue_trial(point, skip_if_exists=True)

    @property
    def objective_key(self) -> str:
        """Result key of the objective of COMPLETE trials."""
        return self._objective_key or self.metric

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record `metric` as an intermediate value of the Optuna trial at step = the epoch.

        Why not OptunaSearch's: it uses ``training_iteration`` as the step, which is the count of
        reports rather than the epoch, and it warns on results of trials it already told.
        Tune does not call this for the result on which the scheduler decides STOP; that one
        arrives with ``on_trial_complete``, which records it through here.
        Repeated steps (a trial restarted from an earlier checkpoint after a failure or a
        resume) are skipped: Optuna keeps the first value of a step anyway, and warns.
        """
        if trial_id in self._completed_trials:
            return  # Told already; after a resume the study may know a trial's end first.
        if trial_id not in self._ot_trials:
            logger.warning(
                "Result for trial %s, which this searcher did not suggest (a trial restarted "
                "under a new id?); Optuna will not see it.",
                trial_id,
            )
            return
        value = result.get(self.metric)
        step = result.get(self.STEP_KEY, result.get(TRAINING_ITERATION))
        steps = self._reported_steps.setdefault(trial_id, set())
        if value is None or step is None or int(step) in steps:
            return
        self._ot_trials[trial_id].report(value, int(step))
        steps.add(int(step))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Tell Optuna COMPLETE only for trials that ended on their own, else PRUNED or FAIL.

        Why: OptunaSearch tells COMPLETE whenever the last result has the metric, so a trial
        that ASHA stopped early would count as a finished, fully trained one. Here:

        - error: FAIL;
        - last result has a truthy ``finished``: COMPLETE with ``result[objective_key]`` (FAIL
          if that key is missing: a COMPLETE trial without its objective would be a lie);
        - any other result: PRUNED (the scheduler stopped it). Its last result is recorded as
          an intermediate value first, because Tune does not pass the result that triggered a
          scheduler stop to ``on_trial_result``;
        - no result at all (stopped before its first report): FAIL, not PRUNED, since TPE ranks
          a PRUNED trial with no intermediate value as the worst one seen, which would be
          evidence against a configuration that was never evaluated, whereas FAIL is ignored.

        The state is then told through OptunaSearch, which maps a result carrying `metric` to
        COMPLETE, ``result=None`` to PRUNED, and ``error=True`` to FAIL.
        """
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            logger.debug("Ignoring completion of trial %s: told already or unknown.", trial_id)
            return
        if result:
            self.on_trial_result(trial_id, result)
        objective = result.get(self.objective_key) if result else None
        if error or not result:
            super().on_trial_complete(trial_id, result=None, error=True)
        elif result.get(self.FINISHED_KEY):
            if objective is None:
                logger.error(
                    "Trial %s finished without %r in its last result; telling Optuna FAIL.",
                    trial_id,
                    self.objective_key,
                )
            super().on_trial_complete(
                trial_id,
                result=None if objective is None else {self.metric: objective},
                error=objective is None,
            )
        else:
            super().on_trial_complete(trial_id, result=None, error=False)
        self._reported_steps.pop(trial_id, None)

    def save(self, checkpoint_path: str) -> None:
        """Pickle the searcher; with a persistent storage, without a copy of the study.

        Why: OptunaSearch pickles the live study and its Optuna trial objects, which is right in
        memory but, with a database, freezes a copy that is older than the database as soon as
        the next trial reports. What is kept instead: each Tune trial's Optuna trial number, and
        the sampler itself, so a resumed TPE continues its random stream instead of re-seeding
        and proposing its first startup configurations again.
        """
        if self._storage is None or self._ot_study is None:
            super().save(checkpoint_path)
            return
        state = self.__dict__.copy()
        state["_ot_study"] = None
        state["_sampler"] = self._ot_study.sampler
        state["_ot_trials"] = {tid: t.number for tid, t in self._ot_trials.items()}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        """Restore the pickled state, then reconcile it with the study in the storage.

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
        """
        super().restore(checkpoint_path)
        if self._storage is None or self._ot_study is not None or not self._space:
            return  # In-memory study (the pickle held it whole), or no study set up yet.
        study = optuna.load_study(
            study_name=self._study_name,
            storage=self._storage,
            sampler=self._sampler,
            pruner=optuna.pruners.NopPruner(),
        )
        frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
        numbers: dict[str, int] = self._ot_trials
        self._ot_study = study
        self._ot_trials = {}
        self._reported_steps = {}
        for trial_id, number in numbers.items():
            trial = frozen[number]
            # Optuna has no public way to re-open an asked trial by number; Trial(study,
            # storage id) is what `Study.ask` itself builds, and reads the trial afresh.
            self._ot_trials[trial_id] = optuna.Trial(study, trial._trial_id)
            if trial.state.is_finished():
                self._completed_trials.add(trial_id)
            elif trial_id not in self._completed_trials:
                self._reported_steps[trial_id] = set(trial.intermediate_values)
        resumed = {numbers[trial_id] for trial_id in self._reported_steps}
        for trial in frozen.values():
            if trial.state == TrialState.RUNNING and trial.number not in resumed:
                logger.info("Optuna trial %d was lost with the interruption: FAIL.", trial.number)
                study.tell(trial.number, state=TrialState.FAIL)
                if "fixed_params" in trial.system_attrs:
                    study.enqueue_trial(trial.system_attrs["fixed_params"])
