"""The search's plots: drawn from a study and a timeline, and written by `search.export`.

The experiment here is made by hand (its study, timeline and Tune's results), so the tests need
no Ray run; test_final.py exports the plots of a real search.
"""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from ray.tune import Result

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.train.keys import SCORE_KEYS
from search import export
from search.experiment import STUDY_FILE, TIMELINE, Experiment, SearchSettings
from search.optuna_searcher import sqlite_url
from search.plots import open_study, rebuilt_study, trial_runs, write_search_plots
from search.storage import Storage
from search.timeline import write_timeline

PNG = b"\x89PNG\r\n\x1a\n"
SEARCH_PLOTS = {"history.png", "intermediate.png", "importances.png"}
DISTRIBUTIONS = {
    "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
    "scheduler.kind": CategoricalDistribution(["onecycle", "cosine"]),
}
TRIALS = [  # (lr, schedule, val mIoU per epoch, finished)
    (1e-3, "onecycle", [0.30, 0.42, 0.51], True),
    (3e-3, "cosine", [0.25, 0.33, 0.38], True),
    (5e-4, "onecycle", [0.28, 0.40, 0.47], True),
    (1e-2, "cosine", [0.12], False),
    (2e-4, "cosine", [0.15, 0.21], False),
]


def frozen(lr, kind, curve, finished):
    """An Optuna trial as the searcher tells it: COMPLETE with its best score, else PRUNED."""
    return create_trial(
        state=TrialState.COMPLETE if finished else TrialState.PRUNED,
        value=max(curve) if finished else None,
        params={"optim.lr": lr, "scheduler.kind": kind},
        distributions=DISTRIBUTIONS,
        intermediate_values=dict(enumerate(curve, start=1)),
    )


def study_of(trials, storage=None, name="s"):
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    study.add_trials([frozen(*t) for t in trials])
    return study


def result(number, lr, kind, curve, finished, folder):
    """Tune's result of a trial of the test search space (a tiny U-Net)."""
    config = {"arch": "unet", "unet.depth": 2, "unet.base_channels": 8}
    config |= {"optim.lr": lr, "scheduler.kind": kind}
    scores = dict.fromkeys(SCORE_KEYS, curve)  # every class as good as the mean
    history = pd.DataFrame({"epoch": range(1, len(curve) + 1), **scores, "finished": False})
    history.loc[history.index[-1], "finished"] = finished
    last = history.iloc[-1].to_dict() | {"val_miou_best": max(curve), "trial_id": f"t{number}"}
    last["config"] = config  # where Result.config reads it
    return Result(last, None, None, str(folder / f"train_trial_t{number}"), history, None)


def timeline_rows():
    """Trial t0 started, retried after one epoch and finished; t1 stopped after one epoch."""
    rows = [{"session": 0, "event": "begin", "trial": "", "t_s": 0.0, "slots": 2}]
    for event, trial, t, epoch_time, score in [
        ("start", "t0", 1.0, None, None),
        ("start", "t1", 1.5, None, None),
        ("result", "t0", 4.0, 2.5, 0.30),
        ("result", "t1", 4.5, 2.5, 0.25),
        ("stop", "t1", 4.6, None, None),
        ("start", "t0", 5.0, None, None),
        ("result", "t0", 8.0, 2.5, 0.42),
        ("stop", "t0", 8.1, None, None),
    ]:
        rows.append({"session": 0, "event": event, "trial": trial, "t_s": t})
        rows[-1] |= {"epoch_time_s": epoch_time, "score": score}
    return rows


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    """A finished search of TRIALS: its driver files, its study in optuna.db, its timeline, and
    Tune's results (what `export.read_results` would read)."""
    storage = Storage(str(tmp_path / "experiments"), shared=False)
    experiment = Experiment.new(storage, "s", TrainConfig(), SearchSettings())
    study_of(TRIALS, sqlite_url(experiment.driver / STUDY_FILE))
    write_timeline(timeline_rows(), experiment.driver / TIMELINE)
    results = [result(n, *t, experiment.driver) for n, t in enumerate(TRIALS)]
    monkeypatch.setattr(export, "read_results", lambda _: results)
    monkeypatch.chdir(tmp_path)  # results/<name> lands here
    return experiment


def pngs(folder):
    return {p.name for p in folder.glob("*.png") if p.read_bytes().startswith(PNG)}


def test_search_plots_of_pruned_and_complete_trials(tmp_path):
    written = write_search_plots(study_of(TRIALS), tmp_path)
    assert {p.name for p in written} == pngs(tmp_path) == SEARCH_PLOTS


def test_a_plot_that_cannot_be_drawn_is_skipped_with_one_line(tmp_path, capsys):
    write_search_plots(study_of(TRIALS[:1] + TRIALS[3:]), tmp_path)  # one trial finished
    assert pngs(tmp_path) == {"history.png", "intermediate.png"}
    assert capsys.readouterr().out.strip().splitlines() == [
        "plots: skipped importances.png: 1 trial(s) ran to their end, importances need 2 or more"
    ]
    write_search_plots(optuna.create_study(), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_trial_runs_split_a_retried_trial_and_place_each_epoch():
    runs = trial_runs(timeline_rows())
    assert [(r.trial, r.start, r.end) for r in runs] == [
        ("t0", 1.0, 4.0),  # no stop before the retry: ends at its last result
        ("t1", 1.5, 4.6),
        ("t0", 5.0, 8.1),
    ]
    assert runs[2].epochs == [(5.5, 8.0, 0.42)]


def test_a_study_rebuilt_from_tunes_results_matches_what_the_searcher_told(tmp_path):
    results = [result(n, *t, tmp_path) for n, t in enumerate(TRIALS)]
    rebuilt = rebuilt_study(results, "s").trials
    told = study_of(TRIALS).trials
    assert [t.state for t in rebuilt] == [t.state for t in told]
    assert [t.value for t in rebuilt] == [t.value for t in told]
    assert [t.intermediate_values for t in rebuilt] == [t.intermediate_values for t in told]
    # The parameters that varied, not the constant architecture.
    assert all(t.params.keys() == {"optim.lr", "scheduler.kind"} for t in rebuilt)


def test_export_writes_the_plots_without_changing_the_study(experiment):
    study_file = experiment.driver / STUDY_FILE
    before = study_file.read_bytes()
    export.export(experiment, top_k=2, arch="any")
    assert pngs(experiment.results / "plots") == SEARCH_PLOTS | {"timeline.png"}
    assert study_file.read_bytes() == before
    assert len(open_study(experiment).trials) == len(TRIALS)


@pytest.mark.parametrize("study", [None, b"", b"not a database"], ids=["missing", "empty", "junk"])
def test_export_without_a_readable_study_plots_the_rebuilt_one(experiment, study, capsys):
    (experiment.driver / STUDY_FILE).unlink()
    if study is not None:
        (experiment.driver / STUDY_FILE).write_bytes(study)
    export.export(experiment, top_k=1, arch="any")
    assert pngs(experiment.results / "plots") == SEARCH_PLOTS | {"timeline.png"}
    assert ("cannot read optuna.db" in capsys.readouterr().out) == (study is not None)


def test_export_still_exports_when_importances_cannot_be_computed(experiment, capsys):
    (experiment.driver / STUDY_FILE).unlink()
    study_of(TRIALS[:1], sqlite_url(experiment.driver / STUDY_FILE))
    assert export.main(["--name", "s", "--arch", "any"]) == 0
    assert (experiment.results / "best_config.yaml").is_file()
    assert "importances.png" not in pngs(experiment.results / "plots")
    assert "plots: skipped importances.png" in capsys.readouterr().out


def test_export_no_plots_writes_none(experiment):
    assert export.main(["--name", "s", "--arch", "any", "--no-plots"]) == 0
    assert (experiment.results / "best_config.yaml").is_file()
    assert not (experiment.results / "plots").exists()


@pytest.mark.parametrize(
    "argv",
    [["--name", "s"], ["--name", "s", "--storage", "experiments"], ["experiments/s"]],
    ids=["name", "name-storage", "positional"],
)
def test_name_and_storage_or_the_folder_find_the_same_experiment(experiment, argv, tmp_path):
    found = Experiment.at(export.location(export.parse_args(argv)))
    assert found.uri == experiment.uri and found.name == "s"
    assert export.main([*argv, "--arch", "any", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "plots" / "history.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no experiment given: name it with --name"),
        (["experiments/s", "--name", "s"], "either as a folder (experiments/s) or as --name"),
        (["experiments/s", "--storage", "x"], "not both"),
    ],
)
def test_the_experiment_is_named_exactly_once(experiment, capsys, argv, message):
    assert run_cli(export.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit):
        export.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "(default: None)" not in text and text.count("(default") == 4
    )  # storage, top-k, arch, out
    assert "(default: experiments)" in text and "--no-plots" in text
