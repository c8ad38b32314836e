"""The search driver: one driver per experiment (its lock), a start that fails leaves nothing,
exit codes that tell the truth, and the leaderboard and timeline written as results arrive."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray import tune
from search_helpers import RAY_ENV, search_args

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.errors import SearchError
from search.experiment import (
    BASE_CONFIG,
    LEADERBOARD,
    LOCK_FILE,
    SETTINGS,
    STUDY_FILE,
    TIMELINE,
    Experiment,
    SearchSettings,
)
from search.lock import DriverLock
from search.optuna_searcher import PruningOptunaSearch
from search.run import main as search_main
from search.storage import Storage
from search.timeline import read_timeline

LOCAL_RAY = {**RAY_ENV, "RAY_ADDRESS": "local"}
"""A Ray of the test's own, not one another process on this machine started."""


@pytest.fixture(scope="module")
def local_ray(ray_env):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")
        yield


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(path: Path, host: str, pid: int, started: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": started, "token": "t"}))


def _study_trials(experiment: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / STUDY_FILE}")
    return study.get_trials(deepcopy=False)


def _parses(folder: Path) -> bool:
    """Whether the live leaderboard (with a row) and timeline are there and parse."""
    try:
        board = pd.read_csv(folder / LEADERBOARD)
        rows = read_timeline(folder / TIMELINE)
    except (OSError, pd.errors.EmptyDataError):
        return False
    return len(board) >= 1 and {"rank", "trial", "val_miou"} <= set(board) and len(rows) >= 1


def test_a_second_driver_is_refused_while_the_first_writes_live_results(
    tiny_archive, tmp_path, capsys
):
    flags = search_args(tiny_archive, tmp_path, "two", samples=3, epochs=2)
    experiment = tmp_path / "two"
    process = subprocess.Popen(
        [sys.executable, "-m", "search.run", *flags],
        env={**os.environ, **LOCAL_RAY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (experiment / LOCK_FILE).is_file() and any(experiment.glob("train_trial_*")):
            break
        time.sleep(0.5)
    assert process.poll() is None, "the first search ended before a second could be started"
    assert run_cli(search_main, flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"error: experiment two is being run by pid {process.pid} on host " in err
    assert f"lock {experiment / LOCK_FILE}" in err and "wait for it or stop it" in err
    live = False
    while process.poll() is None and not live:
        live = _parses(experiment)
        time.sleep(0.5)
    out = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0, out[-3000:]
    assert live, "leaderboard.csv and timeline.csv did not parse while the search ran"
    trials = _study_trials(experiment, "two")
    assert len(trials) == 3
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(pd.read_csv(experiment / LEADERBOARD)) == 3
    assert not (experiment / LOCK_FILE).exists()


def test_lock_refuses_live_and_foreign_drivers_and_takes_over_unreadable_ones(tmp_path, capsys):
    path = tmp_path / "x" / LOCK_FILE
    _write_lock(path, socket.gethostname(), os.getpid(), time.time())
    with pytest.raises(SearchError, match=rf"being run by pid {os.getpid()} .*wait for it"):
        DriverLock(path, "x").__enter__()
    _write_lock(path, "elsewhere", _dead_pid(), time.time())
    with pytest.raises(SearchError, match=r"on host elsewhere .*if it is gone, pass --break-lock"):
        DriverLock(path, "x").__enter__()
    with DriverLock(path, "x", break_lock=True):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists() and "lock: taking over" in capsys.readouterr().out
    path.write_text("{")  # a driver killed while writing its lock
    with pytest.raises(SearchError, match="being started by another driver"):
        DriverLock(path, "x").__enter__()
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(KeyboardInterrupt), DriverLock(path, "x"):
        raise KeyboardInterrupt  # released on Ctrl-C too
    assert not path.exists() and "it is unreadable" in capsys.readouterr().out


def test_a_dead_drivers_lock_is_taken_over_and_the_search_says_what_next(
    local_ray, tiny_archive, tmp_path, capsys
):
    dead = _dead_pid()
    _write_lock(tmp_path / "stale" / LOCK_FILE, socket.gethostname(), dead, time.time() - 60)
    assert search_main(search_args(tiny_archive, tmp_path, "stale", samples=1, epochs=1)) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("lock: taking over")]
    assert f"pid {dead} on host {socket.gethostname()}" in line and "is gone" in line
    assert not (tmp_path / "stale" / LOCK_FILE).exists()
    assert len(pd.read_csv(tmp_path / "stale" / LEADERBOARD)) == 1
    uri = tmp_path / "stale"
    assert f"watch it: tensorboard --logdir {uri}" in out
    assert f"next:     python -m search.export --name stale --storage {tmp_path}" in out
    assert "python -m search.final --config results/stale/best_config.yaml --data " in out


def test_a_start_that_fails_before_its_first_trial_leaves_nothing(
    local_ray, tiny_archive, tmp_path, monkeypatch, capsys
):
    def broken(self, trial_id):
        raise RuntimeError("the searcher broke")

    monkeypatch.setattr(PruningOptunaSearch, "suggest", broken)
    flags = search_args(tiny_archive, tmp_path, "f", samples=2, epochs=1)
    with pytest.raises(Exception, match=r"searcher broke|Tune run failed"):
        search_main(flags)
    experiment = tmp_path / "f"
    assert "removed experiment" in capsys.readouterr().out
    for file in (BASE_CONFIG, SETTINGS, STUDY_FILE, LOCK_FILE):
        assert not (experiment / file).exists(), file
    assert not tune.Tuner.can_restore(str(experiment))
    monkeypatch.undo()
    assert search_main(flags) == 0
    assert "resuming" not in capsys.readouterr().out
    trials = _study_trials(experiment, "f")
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)
    assert len(pd.read_csv(experiment / LEADERBOARD)) == 2


def test_a_new_experiment_removes_and_names_what_a_failed_start_left(tmp_path, capsys):
    storage = Storage(str(tmp_path), shared=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / STUDY_FILE).write_text("a study with no trial run")
    Experiment.new(storage, "x", TrainConfig(), SearchSettings())
    assert not (tmp_path / "x" / STUDY_FILE).exists()
    assert "experiment x: starting afresh; removed optuna.db" in capsys.readouterr().out


def test_a_search_whose_trials_all_fail_exits_non_zero_naming_them(
    local_ray, tiny_archive, tmp_path, capsys
):
    flags = search_args(tiny_archive, tmp_path, "bad", samples=1, epochs=1)
    flags[flags.index("--space") + 1] = "search_space:failing"
    assert run_cli(search_main, flags) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: no trial of experiment bad reported a result; 1 errored: ")
    assert "TrainingError: loss is " in err and "at epoch 1, step " in err
    assert "removed the experiment, so a rerun with its --name starts afresh" in err
    assert not (tmp_path / "bad").exists()  # nothing left to resume the same failure from
    errored = [line for line in captured.out.splitlines() if line.startswith("errored: trial ")]
    [line] = errored
    assert line.split()[2].rstrip(":") in err
