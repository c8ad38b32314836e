"""`python -m search.run` end to end on CPU: ASHA + TPE, outputs, resume and one-line errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import ray
import torch
from PIL import Image
from ray.tune.stopper import TimeoutStopper
from search_helpers import RAY_ENV, SPACE, search_args
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

from marsseg.cli import run_cli
from marsseg.config import TrainConfig, preset
from marsseg.data import archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.errors import ConfigError
from marsseg.train import fit
from marsseg.train.keys import EPOCH, IOU_KEYS, VAL_MIOU
from search.asha import ASHA_STATE
from search.experiment import STUDY_FILE, TIMELINE, Experiment, SearchSettings
from search.final import final_epochs
from search.optuna_searcher import PruningOptunaSearch
from search.results import LiveLeaderboard, best_first, summarise_trial, with_provenance
from search.run import main as search_main
from search.run import parse_args
from search.storage import Storage
from search.timeline import read_timeline, summarise_timeline
from search.trainable import CHECKPOINT_FILE, PANEL_TAG
from spaces import get_space


@pytest.fixture(scope="module")
def finished_search(ray_env, tiny_archive, tmp_path_factory):
    storage = tmp_path_factory.mktemp("experiments")
    assert search_main(search_args(tiny_archive, storage, "s")) == 0
    return storage / "s"


def test_search_runs_trials_and_asha_stops_some(finished_search):
    board = pd.read_csv(finished_search / "leaderboard.csv")
    assert len(board) == 8 and board["rank"].tolist() == list(range(1, 9))
    assert board["val_miou"].is_monotonic_decreasing
    assert (board["status"] == "stopped").any(), "ASHA stopped no trial"
    assert (board["epochs"] < 3).any() and (board["epochs"] == 3).any()


def test_stopped_trials_are_pruned_in_optuna_and_reference_is_trial_0(finished_search):
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{finished_search / STUDY_FILE}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 8
    assert trials[0].params == get_space(SPACE).points_to_evaluate[0]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 8
    for trial in pruned:
        steps = sorted(trial.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) < 3
    for trial in complete:
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.value == pytest.approx(max(trial.intermediate_values.values()))


def test_best_config_loads_and_trains(finished_search, tiny_archive):
    from marsseg.data import load_archive

    best = TrainConfig.load(finished_search / "best_config.yaml")
    board = pd.read_csv(finished_search / "leaderboard.csv")
    assert best.provenance["trial"] == str(board["trial"][0])
    assert best.provenance["val_miou"] == pytest.approx(board["val_miou"][0], abs=1e-4)
    assert {"data_checksum", "code_version", "seed"} <= set(best.provenance)
    result = fit(best.replace(max_epochs=1), load_archive(tiny_archive), num_threads=2)
    assert len(result.history) == 1


def test_tensorboard_files_hold_scalars_and_image_panels(finished_search):
    """TensorBoard's own reader finds every trial's scalars and decodes its image panels, and
    no event file in storage ends short (one synced while its writer was still writing)."""
    trial_dirs = [p for p in finished_search.iterdir() if p.name.startswith("train_trial_")]
    assert len(trial_dirs) == 8
    for trial_dir in trial_dirs:
        files = sorted(trial_dir.glob("events.out.tfevents.*"))
        for path in files:
            records = list(RawEventFileLoader(str(path)).Load())
            # A TFRecord is length (8 bytes), its CRC (4), the data and the data's CRC (4).
            read = sum(len(record) + 16 for record in records)
            assert read == path.stat().st_size, f"{path} is truncated"
        board = EventAccumulator(str(trial_dir), size_guidance={IMAGES: 0}).Reload()
        assert "ray/tune/val_miou" in board.Tags()["scalars"], trial_dir
        panels = board.Images(PANEL_TAG) if PANEL_TAG in board.Tags()[IMAGES] else []
        assert panels, f"no image panel in {trial_dir} ({[p.name for p in files]})"
        for panel in panels:
            with Image.open(io.BytesIO(panel.encoded_image_string)) as image:
                image.load()
                assert image.size == (panel.width, panel.height), trial_dir


def test_timeline_records_every_trial_and_epoch(finished_search):
    rows = read_timeline(finished_search / TIMELINE)
    board = pd.read_csv(finished_search / "leaderboard.csv")
    starts = [r for r in rows if r["event"] == "start"]
    results = [r for r in rows if r["event"] == "result"]
    assert {r["trial"] for r in starts} == set(board["trial"]) and len(starts) == 8
    assert len(results) == board["epochs"].sum()
    assert all(r["epoch_time_s"] > 0 and r["report_prep_s"] >= 0 for r in results)
    assert sum(r["setup_s"] is not None for r in results) == 8  # first epoch of each trial
    summary = summarise_timeline(rows)
    assert (summary.trials, summary.slots) == (8, 2) and 0 < summary.idle_share < 1
    assert len(summary.start_latency_s) == 8 and min(summary.start_latency_s) > 0


def test_random_sampler_fifo_no_reference_and_sparse_checkpoints(
    ray_env, tiny_archive, tmp_path, capsys
):
    args = search_args(tiny_archive, tmp_path, "rf", samples=3, epochs=3)
    args += ["--sampler", "random", "--scheduler", "fifo", "--no-reference-trial"]
    assert search_main([*args, "--checkpoint-every", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("timeline: 3 trials, 9 epochs") for line in printed)
    experiment = tmp_path / "rf"
    study = optuna.load_study(study_name="rf", storage=f"sqlite:///{experiment / STUDY_FILE}")
    trials = study.get_trials(deepcopy=False)
    # fifo: no trial stopped early, so Optuna sees them all COMPLETE with every epoch.
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(len(t.intermediate_values) == 3 for t in trials)
    assert not any("fixed_params" in t.system_attrs for t in trials)  # nothing enqueued
    assert trials[0].params != get_space(SPACE).points_to_evaluate[0]
    [searcher_state] = experiment.glob("searcher-state-*.pkl")
    sampler = PruningOptunaSearch.saved_sampler(searcher_state)
    assert isinstance(sampler, optuna.samplers.RandomSampler)
    for trial_dir in experiment.glob("train_trial_*"):
        saved = [
            torch.load(path, weights_only=True)["epoch"]
            for path in trial_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}")
        ]
        assert sorted(saved) == [2, 3], trial_dir  # every 2nd epoch and the last


def test_a_spent_time_budget_leaves_no_trial_running_in_the_study(
    ray_env, tiny_archive, tmp_path, capsys, monkeypatch
):
    """Tune stops the trials a spent --time-budget cuts short without telling the searcher; the
    search tells the study, so that none stays RUNNING for good (in optuna-dashboard, or when
    the study is read or continued later)."""
    # The budget is spent once a trial reports epoch 2: the clock's stop, on cue.
    epochs: list[int] = []
    monkeypatch.setattr(TimeoutStopper, "__call__", lambda _, __, r: epochs.append(r[EPOCH]))
    monkeypatch.setattr(TimeoutStopper, "stop_all", lambda _: max(epochs, default=0) >= 2)
    args = search_args(tiny_archive, tmp_path, "budget", samples=4, epochs=3)
    assert search_main([*args, "--time-budget", "3600"]) == 0
    assert "the time budget ended Optuna trials" in capsys.readouterr().out
    study_file = tmp_path / "budget" / STUDY_FILE
    trials = optuna.load_study(study_name="budget", storage=f"sqlite:///{study_file}").trials
    assert max(epochs) == 2  # The budget ended the search: no trial reached epoch 3.
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert any(sorted(t.intermediate_values) == [1, 2] for t in stopped)


def test_reference_space_runs_the_recipe(ray_env, tiny_archive, tmp_path):
    args = search_args(tiny_archive, tmp_path, "ref", samples=1, space="reference", epochs=1)
    # What is tested is the config the space yields, not what MarsSeg learns: few images do.
    assert search_main([*args, "--limit-images", "48"]) == 0
    best = TrainConfig.load(tmp_path / "ref" / "best_config.yaml")
    assert best == preset("reference").replace(max_epochs=1)


def _epochs(scores: list[float]) -> pd.DataFrame:
    """A trial's per-epoch results, each class's IoU half the epoch's mIoU."""
    rows = [{EPOCH: e, VAL_MIOU: s} for e, s in enumerate(scores, start=1)]
    return pd.DataFrame([{**r, **{k: r[VAL_MIOU] / 2 for k in IOU_KEYS.values()}} for r in rows])


def test_trials_rank_by_their_best_epoch_which_search_final_scales(tmp_path):
    """A trial scores its best epoch, not its last, and that epoch is what the exported config
    hands `search.final` to scale. Guards against ranking and exporting by the last epoch."""
    base = TrainConfig()
    peaked = summarise_trial("peaked", {}, base, _epochs([0.5, 0.9, 0.6]), {}, "complete")
    steady = summarise_trial("steady", {}, base, _epochs([0.7, 0.75, 0.8]), {}, "complete")
    assert [s.trial_id for s in best_first([steady, peaked])] == ["peaked", "steady"]
    assert (peaked.best_epoch, peaked.epochs) == (2, 3)
    assert peaked.scores == {VAL_MIOU: 0.9, **{k: 0.45 for k in IOU_KEYS.values()}}
    experiment = Experiment("x", Storage(str(tmp_path), shared=False), base, SearchSettings())
    config = with_provenance(peaked, experiment).replace(val_fraction=0.2)
    assert (config.provenance["best_epoch"], config.provenance["val_miou"]) == (2, 0.9)
    assert final_epochs(config, None)[0] == 3  # 2 / (1 - 0.2), rounded up
    assert final_epochs(config, 7)[0] == 7


def test_live_leaderboard_is_written_as_results_arrive(tmp_path, monkeypatch):
    """The leaderboard ranks the trials as they report, not only once they end. Guards against
    a callback that writes it only when a trial ends (or the search does)."""
    board = LiveLeaderboard(tmp_path, TrainConfig())
    trial_a, trial_b = (SimpleNamespace(trial_id=t, config={}) for t in ("a", "b"))

    def report(trial, epoch: int, score: float) -> pd.DataFrame:
        result = {EPOCH: epoch, VAL_MIOU: score, **{k: score for k in IOU_KEYS.values()}}
        board.on_trial_result(epoch, [], trial, {**result, "finished": False})
        return pd.read_csv(tmp_path / "leaderboard.csv", dtype={"trial": str})

    shown = report(trial_a, 1, 0.3)  # the first result is written at once
    assert shown[["trial", "epochs", "val_miou", "status"]].values.tolist() == [
        ["a", 1, 0.3, "running"]
    ]
    monkeypatch.setattr("search.results.LIVE_WRITE_S", 0.0)  # then at most this often
    shown = report(trial_b, 1, 0.5)
    assert shown["trial"].tolist() == ["b", "a"]
    shown = report(trial_a, 2, 0.7)
    assert shown[["trial", "epochs", "best_epoch"]].values.tolist() == [["a", 2, 2], ["b", 1, 1]]
    board.on_trial_complete(2, [], trial_b)
    shown = pd.read_csv(tmp_path / "leaderboard.csv", dtype={"trial": str})
    assert shown["status"].tolist() == ["running", "stopped"]


def _epochs_per_trial(experiment: Path) -> dict[str, list[int]]:
    runs = {}
    for result in experiment.glob("train_trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        runs[result.parent.name] = [line["epoch"] for line in lines]
    return runs


def test_interrupted_search_resumes_from_an_empty_driver_folder(tiny_archive, tmp_path):
    """Shared (file://) storage: the driver's files are uploaded beside the trials, so a search
    interrupted on one head resumes on another whose driver folder starts empty."""
    env = {**os.environ, **RAY_ENV}
    storage = f"file://{tmp_path / 'shared'}"
    flags = search_args(tiny_archive, tmp_path, "r", 6)
    flags[flags.index("--storage") + 1] = storage
    command = [sys.executable, "-m", "search.run", *flags]
    first, second = tmp_path / "head-a", tmp_path / "head-b"
    first.mkdir()
    second.mkdir()
    process = subprocess.Popen(
        command, env=env, cwd=first, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    experiment = tmp_path / "shared" / "r"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        done = [e for e in _epochs_per_trial(experiment).values() if e and e[-1] == 3]
        if len(done) >= 1 and len(_epochs_per_trial(experiment)) >= 3:
            break
        time.sleep(1)
    assert process.poll() is None, "the search ended before it could be interrupted"
    process.send_signal(signal.SIGINT)  # what Ctrl-C does: Tune saves its state and stops
    # ... and returns as if the search had ended: the command still says it did not.
    assert process.wait(timeout=120) == 130
    # Ray forwards its workers' log lines asynchronously: some may follow the error line.
    errors = [line for line in process.stderr.read().decode().splitlines() if "error:" in line]
    resume = f"continue with: python -m search.run --name r --storage {storage} --resume"
    assert len(errors) == 1 and errors[0].startswith("error: interrupted after "), errors
    assert errors[0].endswith(resume), errors
    before = _epochs_per_trial(experiment)
    assert 0 < len(before) < 6 or any(e[-1] < 3 for e in before.values())
    assert (first / "experiments" / "r" / STUDY_FILE).is_file()
    shutil.rmtree(first)  # the first head is gone

    resumed = subprocess.run(
        [*command, "--resume"], env=env, cwd=second, capture_output=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    after = _epochs_per_trial(experiment)
    board = pd.read_csv(second / "experiments" / "r" / "leaderboard.csv")
    assert len(board) == 6 and set(board["status"]) <= {"complete", "stopped"}
    for trial, epochs in after.items():
        # Epochs only ever continue: no trial restarted from epoch 1 after the interruption.
        assert epochs == sorted(epochs) and len(epochs) == len(set(epochs)), (trial, epochs)
        if before.get(trial) and before[trial][-1] == 3:
            assert epochs == before[trial], f"finished trial {trial} ran again"
    # The study went on from the uploaded copy (one Optuna trial per Tune trial, none lost),
    # and the copy in storage is up to date with it.
    for study_file in (second / "experiments" / "r" / STUDY_FILE, experiment / STUDY_FILE):
        study = optuna.load_study(study_name="r", storage=f"sqlite:///{study_file}")
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        assert len([t for t in finished if t.state != optuna.trial.TrialState.FAIL]) == 6
        # Trials the interruption cut short and the resume finished are COMPLETE, as in Tune
        # (not closed as stopped when the first head's run returned).
        complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == (board["status"] == "complete").sum()
    # ASHA went on from the rungs the first head recorded (its state came with the driver
    # files): every trial is recorded at the first rung, also those that ended before the
    # interruption, and the trials it stopped are the ones that ended short of the last epoch.
    rungs = json.loads((second / "experiments" / "r" / ASHA_STATE).read_text())
    trials = pd.read_csv(second / "experiments" / "r" / "leaderboard.csv", dtype={"trial": str})
    first_rung = next(r["recorded"] for r in rungs["rungs"] if r["milestone"] == 1)
    assert set(first_rung) == set(trials["trial"])
    assert set(rungs["stopped"]) == set(trials.loc[trials["epochs"] < 3, "trial"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data", "/nonexistent/mars.npz"], "archive not found: /nonexistent/mars.npz"),
        (["--space", "nope"], "unknown search space 'nope'"),
        (["--address", f"127.0.0.1:{_closed_port()}"], "cannot reach a Ray cluster at 127.0.0.1"),
        (["--gpus-per-trial", "2"], "--gpus-per-trial 2 is more than any node has"),
        (["--num-samples", "0"], "argument --num-samples: must be an integer >= 1, got 0"),
        (
            ["--checkpoint-every", "0"],
            "argument --checkpoint-every: must be an integer >= 1, got 0",
        ),
        (["--resume"], "--resume needs --name"),
    ],
)
def test_bad_input_gives_one_line(ray_env, tiny_archive, tmp_path, capsys, extra, expected):
    if "--gpus-per-trial" in extra:
        ray.shutdown()
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)  # one logical GPU
    storage = tmp_path / "team" / "experiments"  # a first search: neither folder exists yet
    args = ["--data", str(tiny_archive), "--storage", str(storage), *extra]
    try:
        assert run_cli(search_main, args) == 2
    finally:
        if "--gpus-per-trial" in extra:
            ray.shutdown()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "team").exists()  # a refused start leaves no empty storage behind


def test_unwritable_storage_and_bad_archive(tiny_archive, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli(search_main, ["--data", str(tiny_archive), "--storage", str(blocker / "x")]) == 2
    expected = f"error: storage {blocker / 'x'} lies under {blocker}, a file\n"
    assert capsys.readouterr().err == expected
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    assert run_cli(search_main, ["--data", str(bad), "--storage", str(tmp_path)]) == 2
    assert "bad.npz is not a NumPy .npz archive" in capsys.readouterr().err


def test_config_file_supplies_flags(tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text("space: nope\nnum-samples: 3\n")
    assert run_cli(search_main, ["--config", str(config)]) == 2
    assert "unknown search space 'nope'" in capsys.readouterr().err
    config.write_text("spaces: default\n")
    assert run_cli(search_main, ["--config", str(config)]) == 2
    assert "unknown key 'spaces'" in capsys.readouterr().err
    config.write_text("sampler: grid\n")
    assert run_cli(search_main, ["--config", str(config)]) == 2
    assert "--sampler must be one of tpe, random" in capsys.readouterr().err


def test_config_file_reads_yaml_12_numbers(tmp_path):
    """`time-budget: 36e2` is a number in YAML 1.2; an integer flag still refuses a float."""
    config = tmp_path / "search.yaml"
    config.write_text("time-budget: 36e2\nreduction-factor: 3E0\n")
    args, _ = parse_args(["--config", str(config)])
    assert (args.time_budget, args.reduction_factor) == (3600.0, 3.0)
    config.write_text("num-samples: 1e1\n")
    with pytest.raises(ConfigError, match=r"--num-samples: must be an integer >= 1, got '10\.0'"):
        parse_args(["--config", str(config)])


def test_archive_checksum_is_stable():
    s = generate(n_train=8, n_test=1, seed=0, n_aliens=0)
    a = archive_from_arrays(s.training_set, s.test_set)
    assert a.checksum() == archive_from_arrays(s.training_set.copy()).checksum()
