"""The experiment object: saved settings, resume, the data check and the driver's files."""

from __future__ import annotations

import pandas as pd
import pytest
from search_helpers import search_args

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.data import save_archive
from marsseg.data.synthetic import generate
from marsseg.errors import ConfigError, SearchError
from search.experiment import BASE_CONFIG, SETTINGS, Experiment, SearchSettings
from search.run import main as search_main
from search.storage import Storage


@pytest.fixture(scope="module")
def small_search(ray_env, tiny_archive, tmp_path_factory):
    """A finished two-trial, one-epoch search, for the resume tests."""
    storage = tmp_path_factory.mktemp("small")
    args = search_args(tiny_archive, storage, "small", samples=2, epochs=1)
    assert search_main(args) == 0
    return storage


def test_resume_keeps_the_saved_settings_and_names_the_flags_it_ignores(
    small_search, tiny_archive, monkeypatch, capsys
):
    import search.run

    measured = []
    monkeypatch.setattr(search.run, "check_gpu_packing", lambda base, *_: measured.append(base))
    args = search_args(tiny_archive, small_search, "small", samples=5, epochs=3)
    assert search_main([*args, "--seed", "7", "--train-config", "elsewhere.yaml"]) == 0
    out = capsys.readouterr().out
    assert "resuming experiment" in out
    [line] = [line for line in out.splitlines() if line.startswith("resume: ignoring")]
    for flag in ("--num-samples 5 (kept: 2)", "--max-epochs 3 (kept: 1)", "--seed 7 (kept: 0)"):
        assert flag in line, line
    assert "--train-config elsewhere.yaml" in line
    # The pre-flight checks saw the experiment's base config, not one built from these flags.
    [base] = measured
    assert (base.max_epochs, base.seed) == (1, 0)
    board = pd.read_csv(small_search / "small" / "leaderboard.csv")
    assert len(board) == 2 and board["epochs"].max() == 1  # nothing more was trained


def test_resume_on_other_data_is_refused_in_one_line(small_search, tmp_path, capsys):
    other = generate(n_train=40, n_test=2, seed=9, n_aliens=0)
    path = tmp_path / "other.npz"
    save_archive(path, other.training_set, other.test_set)
    args = ["--data", str(path), "--storage", str(small_search), "--name", "small", "--resume"]
    assert run_cli(search_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: experiment small was started on data with checksum ")
    assert f"but {path} has checksum " in err


def test_settings_round_trip_and_name_bad_values(tmp_path):
    settings = SearchSettings(space="marsseg", num_samples=3, time_budget=60, seed=2)
    settings.save(tmp_path / SETTINGS)
    assert SearchSettings.load(tmp_path / SETTINGS) == settings
    (tmp_path / "bad.yaml").write_text("num_samples: three\n")
    with pytest.raises(ConfigError, match="num_samples must be int, got 'three'"):
        SearchSettings.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("num_sample: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'num_sample'"):
        SearchSettings.load(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--grace-period must be an integer >= 1, got 0"):
        SearchSettings(grace_period=0)
    for bad in ({"reduction_factor": float("nan")}, {"time_budget": 0}, {"limit_images": -5}):
        with pytest.raises(ConfigError, match=f"--{next(iter(bad)).replace('_', '-')} must be"):
            SearchSettings(**bad)


def test_differences_name_only_changed_settings():
    saved = SearchSettings(max_epochs=10, seed=1, data="/data/a.npz")
    requested = {"max_epochs": 10, "seed": 3, "data": "/elsewhere/a.npz", "address": "auto"}
    assert saved.differences(requested) == ["--seed 3 (kept: 1)"]


def test_driver_folder_is_the_experiment_or_a_relative_copy(tmp_path):
    local = Experiment("x", Storage(str(tmp_path), shared=False), TrainConfig(), SearchSettings())
    assert local.driver == tmp_path / "x" and local.uri == f"{tmp_path}/x"
    shared = Experiment("x", Storage("s3://bucket/p", shared=True), TrainConfig(), SearchSettings())
    assert shared.uri == "s3://bucket/p/x" and not shared.driver.is_absolute()
    assert shared.study_url == "sqlite:///experiments/x/optuna.db"


def test_shared_storage_gets_the_driver_files_and_a_new_driver_fetches_them(tmp_path, monkeypatch):
    """What `--resume` on a new head relies on: the files reach the storage and come back."""
    storage = Storage(str(tmp_path / "bucket"), shared=True)
    for head in ("head-a", "head-b"):
        (tmp_path / head).mkdir()
    monkeypatch.chdir(tmp_path / "head-a")
    base = TrainConfig().replace(provenance={"data_checksum": "abc"})
    Experiment.new(storage, "x", base, SearchSettings(seed=4))
    assert (tmp_path / "bucket" / "x" / BASE_CONFIG).is_file()
    monkeypatch.chdir(tmp_path / "head-b")
    resumed = Experiment.resume(storage, "x")
    assert resumed.settings.seed == 4 and resumed.data_checksum == "abc"
    assert (tmp_path / "head-b" / "experiments" / "x" / BASE_CONFIG).is_file()
    with pytest.raises(SearchError, match=r"checksum abc, but other\.npz has checksum def"):
        resumed.check_data("def", "other.npz")


def test_export_location_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SearchError, match="no search experiment at"):
        Experiment.at(str(tmp_path / "missing"))
    with pytest.raises(SearchError, match="no search experiment at"):
        Experiment.at(f"file://{tmp_path}/missing")
    assert not (tmp_path / "experiments").exists()  # a failed lookup leaves no driver folder


def test_the_storage_flag_the_next_steps_print_opens_the_experiment(tmp_path, monkeypatch):
    """`search.run` names a `file://` storage as `--storage file://...` (spaces escaped), and
    `search.export --name x --storage <that>` must find the experiment there again."""
    monkeypatch.chdir(tmp_path)
    storage = Storage(str(tmp_path / "nfs mount"), shared=True)
    Experiment.new(storage, "x", TrainConfig(), SearchSettings(seed=4))
    assert storage.flag == f"file://{tmp_path}/nfs%20mount"
    opened = Experiment.at(f"{storage.flag}/x")
    assert opened.storage == storage and opened.settings.seed == 4
