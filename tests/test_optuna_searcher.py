"""PruningOptunaSearch: scheduler-stopped trials reach Optuna as PRUNED, and the study persists.

The unit tests drive the searcher the way Tune does (suggest, on_trial_result,
on_trial_complete, save, restore) without Ray. The two Ray tests run a tiny experiment with
ASHA on a local 2-CPU Ray, and an interrupted one resumed with `Tuner.restore`, then read the
study back from its SQLite file with `optuna.load_study`.
"""

from __future__ import annotations

import ast
import math
import os
import pickle
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import ray.cloudpickle
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from search.optuna_searcher import PruningOptunaSearch, close_stopped_trials, sqlite_url

MAX_EPOCHS = 4
# val_miou / quality at epochs 1..4: peaks at epoch 2, so a trial's best differs from its last.
CURVE = (0.4, 0.9, 0.8, 0.7)
NUM_SAMPLES = 8
# Trial 0 runs to MAX_EPOCHS; trial 1 stops itself at epoch 3 (no gain for one epoch). Both have
# the top quality of the space, so ASHA, which stops only what is strictly below a rung's
# median, never stops them; every TPE trial is below them at every epoch, so the first TPE trial
# to reach epoch 1 is always stopped there.
POINTS = [{"quality": 0.95, "patience": 3}, {"quality": 0.95, "patience": 1}]
SEED = 7


def miou(quality: float, epoch: int) -> float:
    """The validation mIoU the fake trainable reports at `epoch`."""
    return quality * CURVE[epoch - 1]


def space(trial: optuna.Trial) -> dict[str, Any]:
    """Define-by-run space, at module level so that Tune can pickle it into tuner.pkl."""
    trial.suggest_float("quality", 0.05, 0.95)
    trial.suggest_int("patience", 1, 3)
    return {"max_epochs": MAX_EPOCHS}


def trainable(config: dict[str, Any]) -> None:
    """A training loop in miniature: reports every epoch, stops itself after `patience` epochs
    without a new best, and says `finished` when it ends on its own."""
    best, since_best = -math.inf, 0
    for epoch in range(1, config["max_epochs"] + 1):
        value = miou(config["quality"], epoch)
        best, since_best = (value, 0) if value > best else (best, since_best + 1)
        finished = epoch == config["max_epochs"] or since_best >= config["patience"]
        tune.report(
            {"epoch": epoch, "val_miou": value, "val_miou_best": best, "finished": finished}
        )
        if finished:
            return


def make_searcher(storage: str | None = None, **kwargs: Any) -> PruningOptunaSearch:
    """The searcher as `search/run.py` would build it, with this module's space."""
    return PruningOptunaSearch(
        space,
        metric="val_miou",
        mode="max",
        objective_key="val_miou_best",
        points_to_evaluate=kwargs.pop("points_to_evaluate", POINTS),
        seed=SEED,
        study_name="marsseg",
        storage=storage,
        **kwargs,
    )


def result(epoch: int, quality: float = 0.5, finished: bool = False, **extra: Any) -> dict:
    """A flattened Tune result as the trainable above would report it."""
    values = [miou(quality, e) for e in range(1, epoch + 1)]
    return {
        "epoch": epoch,
        "training_iteration": epoch,
        "val_miou": values[-1],
        "val_miou_best": max(values),
        "finished": finished,
        **extra,
    }


def frozen(searcher: PruningOptunaSearch, trial_id: str) -> optuna.trial.FrozenTrial:
    """The Optuna trial behind a Tune trial id, as stored now."""
    return searcher.optuna_trial(trial_id)


# --- Unit tests: the searcher driven as Tune drives it, no Ray ----------------------------


def test_scheduler_stop_is_pruned_with_every_epoch_recorded() -> None:
    searcher = make_searcher(points_to_evaluate=[])
    config = searcher.suggest("t")
    q = config["quality"]
    assert config["max_epochs"] == MAX_EPOCHS  # The space function's constants reach the config.
    for epoch in (1, 2):
        searcher.on_trial_result("t", result(epoch, q))
    # Tune passes the result that made the scheduler stop the trial only to on_trial_complete.
    searcher.on_trial_complete("t", result(3, q))
    trial = frozen(searcher, "t")
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {e: miou(q, e) for e in (1, 2, 3)}


def test_natural_end_is_complete_with_the_objective_key() -> None:
    searcher = make_searcher(points_to_evaluate=[])
    q = searcher.suggest("t")["quality"]
    for epoch in (1, 2):
        searcher.on_trial_result("t", result(epoch, q))
    searcher.on_trial_complete("t", result(3, q, finished=True))  # Its own early stopping.
    trial = frozen(searcher, "t")
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(miou(q, 2))  # The best epoch's, not the last one's.
    assert trial.value != pytest.approx(trial.intermediate_values[3])


@pytest.mark.parametrize(
    ("kwargs", "state"),
    [
        ({"error": True}, TrialState.FAIL),
        ({"result": None}, TrialState.FAIL),  # Never reported: no evidence either way.
        ({"result": {"epoch": 2, "val_miou": 0.3, "finished": True}}, TrialState.FAIL),
        ({"result": {"epoch": 2, "val_miou": 0.3}}, TrialState.PRUNED),
    ],
    ids=["error", "no-result", "finished-without-objective", "stopped"],
)
def test_completion_states(kwargs: dict[str, Any], state: TrialState) -> None:
    searcher = make_searcher(points_to_evaluate=[])
    searcher.suggest("t")
    searcher.on_trial_complete("t", **kwargs)
    assert frozen(searcher, "t").state == state
    searcher.on_trial_complete("t", result(2, finished=True))  # A second completion: ignored.
    assert frozen(searcher, "t").state == state


def test_duplicate_steps_are_ignored_and_training_iteration_is_the_fallback() -> None:
    searcher = make_searcher(points_to_evaluate=[])
    searcher.suggest("t")
    searcher.on_trial_result("t", {"epoch": 1, "val_miou": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when told a step twice: it must not be.
        searcher.on_trial_result("t", {"epoch": 1, "val_miou": 0.9})
    searcher.on_trial_result("t", {"training_iteration": 5, "val_miou": 0.5})
    assert frozen(searcher, "t").intermediate_values == {1: 0.1, 5: 0.5}


def test_points_are_run_first_and_enqueued_once_per_study(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "exp" / "optuna.db")
    make_searcher(url)
    searcher = make_searcher(url)  # E.g. the script building a searcher before a resume.
    study = optuna.load_study(study_name="marsseg", storage=url)
    assert [t.state for t in study.trials] == [TrialState.WAITING] * len(POINTS)
    assert searcher.suggest("a") == {**POINTS[0], "max_epochs": MAX_EPOCHS}
    assert searcher.suggest("b") == {**POINTS[1], "max_epochs": MAX_EPOCHS}


def test_multi_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="single-objective"):
        PruningOptunaSearch(space, metric=["val_miou", "loss"], mode=["max", "min"])


def test_save_restore_round_trip_in_memory(tmp_path: Path) -> None:
    searcher = make_searcher(points_to_evaluate=[])
    q = searcher.suggest("a")["quality"]
    searcher.suggest("b")
    searcher.on_trial_result("a", result(1, q))
    searcher.on_trial_complete("b", result(1))
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = make_searcher(points_to_evaluate=[])
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [t.state for t in restored.study.trials] == [TrialState.RUNNING, TrialState.PRUNED]
    restored.on_trial_result("a", result(1, q))  # Re-reported after a restart: ignored.
    restored.on_trial_complete("a", result(2, q, finished=True))
    trial = frozen(restored, "a")
    assert trial.state == TrialState.COMPLETE
    assert trial.intermediate_values == {1: miou(q, 1), 2: miou(q, 2)}


def test_restore_reconciles_the_checkpoint_with_the_database(tmp_path: Path) -> None:
    """Tune's searcher checkpoint lags the database; the restored searcher must agree with it.

    At the checkpoint, points a, b and c run, a has reported epoch 1. Between it and the
    interruption: a reports epoch 2, b ends on its own, c is pruned, and d (point 3) and e (a
    TPE draw) are suggested, which the resumed Tune will never know about.
    """
    url = sqlite_url(tmp_path / "exp" / "optuna.db")
    points = [*POINTS, {"quality": 0.5, "patience": 2}, {"quality": 0.3, "patience": 1}]
    searcher = make_searcher(url, points_to_evaluate=points)
    qa, qb, qc = (searcher.suggest(t)["quality"] for t in "abc")
    searcher.on_trial_result("a", result(1, qa))
    searcher.save(str(tmp_path / "searcher.pkl"))

    searcher.on_trial_result("a", result(2, qa))
    searcher.on_trial_complete("b", result(3, qb, finished=True))
    searcher.on_trial_complete("c", result(1, qc))
    assert searcher.suggest("d") == {**points[3], "max_epochs": MAX_EPOCHS}
    searcher.suggest("e")
    before = {t.number: t for t in searcher.study.get_trials()}

    # As in Tuner.restore: a searcher built like the original one, then restored.
    restored = make_searcher(url, points_to_evaluate=points)
    restored.restore(str(tmp_path / "searcher.pkl"))

    def states() -> list[TrialState]:
        return [t.state for t in optuna.load_study(study_name="marsseg", storage=url).trials]

    # The database's records of b and c stand; d and e are FAIL, and point 3 is queued again.
    assert states() == [
        TrialState.RUNNING,
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.WAITING,
    ]
    # Tune re-runs b and c (running at its checkpoint): nothing more reaches Optuna.
    restored.on_trial_result("b", result(1, qb))
    restored.on_trial_complete("b", result(4, qb, finished=True))
    restored.on_trial_complete("c", result(4, qc, finished=True))
    # a restarts from scratch: epochs 1-2 are known, 3-4 are new; then it ends on its own.
    for epoch in range(1, MAX_EPOCHS):
        restored.on_trial_result("a", result(epoch, qa))
    restored.on_trial_complete("a", result(MAX_EPOCHS, qa, finished=True))
    # The lost point runs again, as a new trial.
    assert restored.suggest("f") == {**points[3], "max_epochs": MAX_EPOCHS}

    after = {t.number: t for t in optuna.load_study(study_name="marsseg", storage=url).trials}
    for number in (1, 2):
        assert after[number] == before[number]
    assert after[0].state == TrialState.COMPLETE
    assert after[0].intermediate_values == {e: miou(qa, e) for e in range(1, MAX_EPOCHS + 1)}
    assert after[0].value == pytest.approx(miou(qa, 2))
    assert after[5].state == TrialState.RUNNING and after[5].params == points[3]
    assert len(after) == 6


def test_restore_continues_the_sampler_stream(tmp_path: Path) -> None:
    """A resumed TPE continues its random stream; re-seeded, it would repeat its first draws."""
    url = sqlite_url(tmp_path / "exp" / "optuna.db")
    searcher = make_searcher(url, points_to_evaluate=[])
    first = searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    lost = searcher.suggest("b")  # Drawn after the checkpoint, then lost.

    restored = make_searcher(url, points_to_evaluate=[])
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("b") == lost != first


def test_saved_state_is_a_plain_dict_with_public_keys(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "exp" / "optuna.db")
    searcher = make_searcher(url, points_to_evaluate=[])
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_complete("b", result(1))
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    state = pickle.loads(path.read_bytes())
    assert type(state) is dict
    assert state["trials"] == {"a": 0, "b": 1}
    assert state["told"] == ["b"]
    assert state["study_name"] == "marsseg"
    assert state["storage"] is None  # The database is the study: no stale copy of it.
    assert isinstance(state["sampler"], optuna.samplers.TPESampler)
    assert isinstance(PruningOptunaSearch.saved_sampler(path), optuna.samplers.TPESampler)


def test_tune_checkpoint_path_through_wrappers_and_tuner_pickle(tmp_path: Path) -> None:
    """What Tune does, without Ray running: the searcher wrapped in a ConcurrencyLimiter saved
    with `save_to_dir`; on resume, the searcher unpickled from tuner.pkl (pickled before any
    trial) restored with `restore_from_dir`."""
    url = sqlite_url(tmp_path / "exp" / "optuna.db")
    searcher = make_searcher(url)
    tuner_pkl = ray.cloudpickle.dumps(searcher)
    search_alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    q = search_alg.searcher.suggest("a")["quality"]
    search_alg.on_trial_result("a", result(1, q))
    search_alg.save_to_dir(str(tmp_path), session_str="s")
    search_alg.on_trial_result("a", result(2, q))  # Reported after the checkpoint.

    resumed = SearchGenerator(ConcurrencyLimiter(ray.cloudpickle.loads(tuner_pkl), 2))
    resumed.restore_from_dir(str(tmp_path))
    base = resumed.searcher.searcher
    assert base.optuna_trial("a").intermediate_values == {1: miou(q, 1), 2: miou(q, 2)}
    for epoch in (1, 2, 3):
        resumed.on_trial_result("a", result(epoch, q))
    resumed.on_trial_complete("a", result(MAX_EPOCHS, q, finished=True))
    trial = base.optuna_trial("a")
    assert trial.state == TrialState.COMPLETE
    assert trial.intermediate_values == {e: miou(q, e) for e in range(1, MAX_EPOCHS + 1)}
    # The points were enqueued once, by the first searcher.
    assert len(base.study.trials) == len(POINTS)


def test_set_search_properties_follows_rays_contract() -> None:
    searcher = make_searcher(points_to_evaluate=[])
    assert searcher.set_search_properties("val_miou", "max", {})
    assert not searcher.set_search_properties("loss", None, {})  # Conflicting metric.
    assert not searcher.set_search_properties(None, "min", {})  # Conflicting mode.
    # A config to sample from, when the space is the searcher's own: Tune must raise for it.
    assert not searcher.set_search_properties(None, None, {"lr": tune.uniform(0, 1)})
    assert searcher.set_search_properties(None, None, {"constant": 1})

    bare = PruningOptunaSearch(space)  # As if Tune's TuneConfig gave metric and mode.
    assert bare.set_search_properties("val_miou", "max", {})
    assert (bare.metric, bare.mode) == ("val_miou", "max")
    assert bare.study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert set(bare.suggest("t")) == {"quality", "patience", "max_epochs"}

    from_config = PruningOptunaSearch(metric="val_miou", mode="max")
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    assert from_config.set_search_properties(None, None, distributions)
    assert set(from_config.suggest("t")) == {"x"}


def test_uses_only_public_interfaces_of_ray_and_optuna() -> None:
    """No OptunaSearch underneath, and no private name of another object or module (only the
    searcher's own ``self._...``; dunders are Python's protocol): a minor Ray or Optuna release
    must not be able to silently break the searcher."""
    assert not any(cls.__name__ == "OptunaSearch" for cls in PruningOptunaSearch.__mro__)
    assert PruningOptunaSearch.__mro__[1] is ray.tune.search.Searcher
    module = sys.modules[PruningOptunaSearch.__module__]
    tree = ast.parse(Path(module.__file__).read_text())
    # The private attributes Ray's Searcher sets on an instance are Ray's, even through self.
    rays = {name for name in vars(ray.tune.search.Searcher("m", "max")) if name.startswith("_")}
    assert rays  # E.g. _metric and _mode: else this test checks nothing of them.
    private = []
    for node in ast.walk(tree):
        is_dunder = node.attr.startswith("__") if isinstance(node, ast.Attribute) else False
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not is_dunder:
            on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            if not on_self or node.attr in rays:
                private.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names = [*(node.module or "").split("."), *(alias.name for alias in node.names)]
            private += [f"line {node.lineno}: import {n}" for n in names if n.startswith("_")]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                private += [f"line {node.lineno}: import {n}" for n in parts if n.startswith("_")]
    assert not private


# --- Ray: ASHA over a real Tune loop ------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module, quiet and without usage stats, dashboard or uv."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        mp.setenv("RAY_AUTH_MODE", "disabled")  # No token written under ~/.ray.
        mp.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # No CSV/JSON/TensorBoard files.
        # Workers cannot import this test module: ship its functions by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def asha_tuner(
    experiment: Path, callbacks: list | None = None, stop: tune.Stopper | None = None
) -> tune.Tuner:
    """The experiment of `search/run.py` in miniature, its study in the experiment folder."""
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(sqlite_url(experiment / "optuna.db")),
            scheduler=ASHAScheduler(
                metric="val_miou",
                mode="max",
                time_attr="epoch",
                max_t=MAX_EPOCHS,
                grace_period=1,
                reduction_factor=2,
            ),
            num_samples=NUM_SAMPLES,
            max_concurrent_trials=2,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(experiment.parent),
            verbose=0,
            callbacks=callbacks,
            stop=stop,
        ),
    )


def check_study_matches_tune(study: optuna.Study, results: tune.ResultGrid) -> None:
    """Each Tune trial has one Optuna trial, in the state its end calls for, with its epochs."""
    assert not results.errors
    by_params = {tuple(sorted(t.params.items())): t for t in study.trials}
    assert len(results) == NUM_SAMPLES
    for res in results:
        trial = by_params.pop(tuple(sorted((k, res.config[k]) for k in POINTS[0])))
        last = res.metrics
        assert trial.intermediate_values == {
            e: pytest.approx(miou(trial.params["quality"], e)) for e in range(1, last["epoch"] + 1)
        }
        if last["finished"]:
            assert trial.state == TrialState.COMPLETE
            assert trial.value == pytest.approx(last["val_miou_best"])
            assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
        else:
            assert trial.state == TrialState.PRUNED
            assert last["epoch"] < MAX_EPOCHS
    assert all(t.state == TrialState.FAIL for t in by_params.values())  # Only lost trials left.
    assert [t.params for t in study.trials[: len(POINTS)]] == POINTS
    assert sum(t.state == TrialState.PRUNED for t in study.trials) >= 1
    assert study.trials[0].state == TrialState.COMPLETE
    assert len(study.trials[0].intermediate_values) == MAX_EPOCHS
    assert study.trials[1].state == TrialState.COMPLETE  # Stopped itself at epoch 3.
    assert len(study.trials[1].intermediate_values) == 3


def test_asha_stopped_trials_reach_optuna_as_pruned(local_ray: None, tmp_path: Path) -> None:
    experiment = tmp_path / "asha"
    results = asha_tuner(experiment).fit()
    # Read back as optuna-dashboard would: from the file, with no searcher around.
    study = optuna.load_study(study_name="marsseg", storage=sqlite_url(experiment / "optuna.db"))
    assert len(study.trials) == NUM_SAMPLES
    check_study_matches_tune(study, results)


class _InterruptAtEpoch2OfTrial0(tune.Callback):
    """Sends the driver a SIGINT, as Ctrl+C would, when trial 0 reports epoch 2; only once,
    as told by a marker file (the resumed run unpickles its own copy of this callback)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        is_trial_0 = {key: trial.config[key] for key in POINTS[0]} == POINTS[0]
        if is_trial_0 and result["epoch"] == 2 and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGINT)


def test_tuner_restore_continues_the_same_study(local_ray: None, tmp_path: Path) -> None:
    experiment = tmp_path / "resumed"
    url = sqlite_url(experiment / "optuna.db")
    asha_tuner(experiment, callbacks=[_InterruptAtEpoch2OfTrial0(tmp_path / "interrupted")]).fit()
    study = optuna.load_study(study_name="marsseg", storage=url)
    assert study.trials[0].state == TrialState.RUNNING
    assert len(study.trials) < NUM_SAMPLES
    study.ask()  # A trial asked after the last checkpoint, lost with the interruption.

    results = tune.Tuner.restore(str(experiment), trainable=trainable).fit()
    study = optuna.load_study(study_name="marsseg", storage=url)
    assert sum(t.state == TrialState.FAIL for t in study.trials) == 1
    assert len(study.trials) == NUM_SAMPLES + 1
    check_study_matches_tune(study, results)


class _EndAtEpoch2(tune.Stopper):
    """Ends the whole experiment once any trial reports epoch 2, as a spent time budget does."""

    def __init__(self) -> None:
        self.ended = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.ended = self.ended or result["epoch"] >= 2
        return False

    def stop_all(self) -> bool:
        return self.ended


def test_trials_an_ending_experiment_stops_are_closed_after_the_run(
    local_ray: None, tmp_path: Path
) -> None:
    experiment = tmp_path / "ended"
    url = sqlite_url(experiment / "optuna.db")
    asha_tuner(experiment, stop=_EndAtEpoch2()).fit()
    open_trials = [
        t.number
        for t in optuna.load_study(study_name="marsseg", storage=url).trials
        if t.state == TrialState.RUNNING
    ]
    assert open_trials, "Tune told the searcher of every stop: close_stopped_trials is moot"

    assert close_stopped_trials("marsseg", url) == open_trials
    study = optuna.load_study(study_name="marsseg", storage=url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    closed = [t for t in study.trials if t.number in open_trials]
    for trial in closed:
        epochs = len(trial.intermediate_values)
        assert trial.state == (TrialState.PRUNED if epochs else TrialState.FAIL)
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
    assert max(len(t.intermediate_values) for t in closed) == 2  # The trial that ended it.
    assert close_stopped_trials("marsseg", url) == []  # Nothing left open: a rerun is harmless.
