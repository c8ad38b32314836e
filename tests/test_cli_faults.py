"""Bad input, round two, by fault class: unsafe experiment names, inputs only a trial used to
check, non-finite training, degenerate data, numbers out of range, half-made outputs, SIGTERM
and misleading messages. Each CLI case runs through `cli_harness.check_case`: exit 2, one
line `error: ...`, no traceback, nothing written or removed under the case's folder.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import TINY, Case, Place, check_case
from search_helpers import RAY_ENV

import marsseg.data.__main__ as data_cli
import marsseg.models.__main__ as models_cli
import marsseg.train.__main__ as train_cli
from marsseg.config import TrainConfig
from marsseg.data import save_archive
from marsseg.data.synthetic import generate
from marsseg.errors import TrainingError
from marsseg.predict import save_models
from marsseg.train import fit
from search import compare, export
from search import final as final_stage
from search import predict as predict_stage
from search import run as search_run
from search.experiment import Experiment, SearchSettings
from search.storage import Storage
from search.tuner import TrialResources

CASES = {}


def case(name):
    def register(build):
        CASES[name] = build
        return build

    return register


def _storage(p: Place) -> list[str]:
    """A storage holding a finished experiment, with an unrelated file beside the storage:
    `check_case` then checks that both survive the case untouched."""
    storage = p.root / "experiments"
    (storage / "done").mkdir(parents=True)
    (storage / "done" / "leaderboard.csv").write_text("rank,trial\n1,a\n")
    (p.root / "unrelated.txt").write_text("not the project's\n")
    return ["--storage", str(storage), "--data", str(p.archive)]


def _archive(p: Place, name: str, training_set, test_set=None) -> Path:
    return save_archive(p.root / name, training_set, test_set)


# --- 1. names are one folder name -----------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "team/run1", "", "-x", "a/../..", " spaced ", "a\nb"])
def test_unsafe_names_are_refused_and_nothing_is_touched(name, place, monkeypatch, capsys):
    argv = [*_storage(place), f"--name={name}", "--time-budget", "60"]
    check_case(Case(search_run.main, argv, "is not a folder name"), place, monkeypatch, capsys)
    argv = [f"--name={name}", "--storage", str(place.root / "experiments")]
    check_case(Case(export.main, argv, "is not a folder name"), place, monkeypatch, capsys)


def test_a_name_too_long_for_a_folder_is_refused(place, monkeypatch, capsys):
    argv = [*_storage(place), "--name", "é" * 101, "--time-budget", "60"]
    expected = "--name is 202 bytes long; a name has at most 200"
    check_case(Case(search_run.main, argv, expected), place, monkeypatch, capsys)


def test_a_failed_start_removes_only_what_it_made(place, monkeypatch, capsys):
    """A search started on a folder that already holds files, failing before its first trial:
    the folder's own files, the finished experiment beside it and the unrelated file stay."""
    flags = _storage(place)
    mine = place.root / "experiments" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's\n")

    class Failing:
        def fit(self):
            raise search_run.SearchError("planted: the cluster went away")

    resources = (TrialResources(1.0, 0.0, 1), 1)
    monkeypatch.setattr(search_run, "plan_resources", lambda *a, **k: resources)
    monkeypatch.setattr(search_run, "new_tuner", lambda *a, **k: Failing())
    argv = [*flags, "--name", "mine", "--space", "search_space:space", "--num-samples", "1"]
    assert search_main_fails(argv, capsys) == "error: planted: the cluster went away"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (place.root / "experiments" / "done" / "leaderboard.csv").is_file()
    assert (place.root / "unrelated.txt").is_file()


def search_main_fails(argv, capsys) -> str:
    from marsseg.cli import run_cli

    assert run_cli(search_run.main, argv) == 2
    return capsys.readouterr().err.strip()


# --- 2. what trials need is checked before the experiment exists ----------------------------


@case("run: settings file with limit-images -5")
def _(p, mp):
    settings = p.yaml("search.yaml", "limit-images: -5\n")
    argv = [*_storage(p), "--settings", str(settings), "--name", "x"]
    return Case(search_run.main, argv, "--limit-images: must be an integer >= 1, got -5")


@case("run: --limit-images beyond the archive")
def _(p, mp):
    argv = [*_storage(p), "--limit-images", "5000", "--name", "x"]
    return Case(search_run.main, argv, "--limit-images 5000: the cleaned archive holds only")


@case("run: --train-config whose split leaves no validation image")
def _(p, mp):
    config = p.config("c.yaml", val_fraction=0.001)
    argv = [*_storage(p), "--train-config", str(config), "--name", "x"]
    return Case(search_run.main, argv, "leaves 200 for training and 0 for validation")


@case("run: --train-config without a validation split")
def _(p, mp):
    config = p.config("c.yaml", val_fraction=0.0)
    argv = [*_storage(p), "--train-config", str(config), "--name", "x"]
    return Case(search_run.main, argv, "val_fraction is 0, and a search ranks its trials")


@case("run: --final-arch that does not exist, before the search")
def _(p, mp):
    argv = [*_storage(p), "--name", "x", "--final", "--final-arch", "unett"]
    return Case(search_run.main, argv, "--final-arch 'unett': unknown architecture")


@case("run: --storage with a scheme Tune cannot write to")
def _(p, mp):
    argv = [*_storage(p)[2:], "--storage", "ftp://host/experiments", "--name", "x"]
    return Case(search_run.main, argv, "--storage ftp://host/experiments: unknown scheme 'ftp://'")


@case("run: --storage s3:// without a bucket")
def _(p, mp):
    argv = [*_storage(p)[2:], "--storage", "s3:///experiments", "--name", "x"]
    return Case(search_run.main, argv, "--storage s3:///experiments: no bucket named")


@case("run: --storage that is a file")
def _(p, mp):
    argv = [*_storage(p)[2:], "--storage", str(p.blocker), "--name", "x"]
    return Case(search_run.main, argv, f"storage {p.blocker} is a file, not a folder")


@case("run: a grace period longer than the trials")
def _(p, mp):
    argv = [*_storage(p), "--name", "x", "--max-epochs", "2", "--grace-period", "5"]
    return Case(search_run.main, argv, "--grace-period 5 is more than --max-epochs 2: ASHA would")


def _final(p: Place, *flags: str) -> list[str]:
    """`search.final` on a valid config and archive, with `flags`."""
    config = str(p.config("c.yaml"))
    return ["--config", config, "--data", str(p.archive), "--out", str(p.root / "o"), *flags]


@case("final: --gpus-per-trial without folds, where nothing runs as a Ray task")
def _(p, mp):
    expected = "--gpus-per-trial applies to the --folds and --rerank runs (Ray tasks)"
    return Case(final_stage.main, _final(p, "--gpus-per-trial", "1"), expected)


@case("final: --rerank without exported configs, before Ray starts")
def _(p, mp):
    expected = "--rerank: no top-*.yaml configs beside"
    return Case(final_stage.main, _final(p, "--rerank", "2"), expected)


def test_a_resume_that_ignores_a_flag_says_how_to_start_over(tmp_path, monkeypatch, capsys):
    storage = Storage(str(tmp_path), shared=False)
    Experiment.new(storage, "x", TrainConfig(), SearchSettings(limit_images=40))
    monkeypatch.setattr(search_run.tune.Tuner, "can_restore", lambda uri: True)
    args, given = search_run.parse_args(["--name", "x", "--limit-images", "50"])
    search_run.resume_if_asked(args, given, storage)
    out = capsys.readouterr().out
    assert "resume: ignoring --limit-images 50 (kept: 40); to search with them, give a new " in out
    assert f"delete {tmp_path / 'x'} to start this one over" in out


# --- 3. non-finite training stops --------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_at_once_naming_the_step():
    s = generate(n_train=40, n_test=1, seed=0, n_aliens=0)
    from marsseg.data import archive_from_arrays

    archive = archive_from_arrays(s.training_set, s.test_set)
    config = TrainConfig.from_dict({**TINY, "augment": {"preset": "none"}, "optim": {"lr": 1e30}})
    with pytest.raises(TrainingError, match=r"is (nan|inf) at epoch 1, step \d+: lower optim\.lr"):
        fit(config.replace(max_epochs=3), archive, num_threads=1)


@case("train: a learning rate that makes the loss NaN leaves nothing")
def _(p, mp):
    mp.setattr(train_cli, "fit", fit)  # really train: the loss turns NaN in the first epoch
    config = p.yaml(
        "huge.yaml",
        "model: {name: unet, knobs: {depth: 2, base_channels: 8}}\nbatch_size: 4\n"
        "augment: {preset: none}\noptim: {lr: 1.0e+30}\n",
    )
    out = p.root / "run"
    argv = ["--config", str(config), "--data", str(p.archive), "--out", str(out)]
    return Case(train_cli.main, argv, "at epoch 1, step", absent=[out])


@case("train: config optim.lr .inf")
def _(p, mp):
    config = p.yaml("inf.yaml", "optim:\n  lr: .inf\n")
    out = p.root / "run"
    argv = ["--config", str(config), "--out", str(out)]
    return Case(train_cli.main, argv, "optim.lr must be a finite number, got inf", absent=[out])


@case("predict: a model file with NaN weights")
def _(p, mp):
    config = TrainConfig.from_dict(TINY)
    model = config.model.build()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = save_models(p.root / "nan.pt", config, [model])
    out = p.root / "sub.csv"
    argv = ["--model", str(path), "--data", str(p.archive), "--out", str(out)]
    return Case(predict_stage.main, argv, "weights are not finite (NaN or inf in", absent=[out])


# --- 4. degenerate data ------------------------------------------------------------------------


def _scenes(n: int, seed: int = 3) -> np.ndarray:
    return generate(n_train=n, n_test=1, seed=seed, n_aliens=0).training_set


@case("predict: an archive with an empty test set")
def _(p, mp):
    archive = _archive(p, "empty-test.npz", _scenes(10), np.zeros((0, 64, 128), np.float32))
    out = p.root / "sub.csv"
    argv = ["--model", str(p.model), "--data", str(archive), "--out", str(out)]
    return Case(predict_stage.main, argv, "has an empty 'test_set' (0 images)", absent=[out])


@case("train: every image removed as an outlier")
def _(p, mp):
    scenes = _scenes(30)
    scenes[:, 1] = scenes[0, 1]  # one detailed mask shared by all: a pasted group
    archive = _archive(p, "aliens.npz", scenes)
    out = p.root / "run"
    argv = ["--data", str(archive), "--out", str(out)]
    return Case(train_cli.main, argv, "all 30 training images were removed as outliers")


@case("final: more folds than images")
def _(p, mp):
    archive = _archive(p, "three.npz", _scenes(3), _scenes(1)[:, 0])
    out = p.root / "final"
    argv = ["--config", str(p.config("c.yaml")), "--data", str(archive), "--folds", "5"]
    return Case(final_stage.main, [*argv, "--out", str(out)], "5 folds need at least 5 images")


@case("train: a split that leaves no validation image")
def _(p, mp):
    config = p.config("c.yaml", val_fraction=0.001)
    out = p.root / "run"
    argv = ["--config", str(config), "--data", str(p.archive), "--out", str(out)]
    return Case(train_cli.main, argv, "and 0 for validation; each needs at least one image")


@case("data inspect: more samples than images")
def _(p, mp):
    argv = ["inspect", str(p.archive), "--samples", "500", "--out", str(p.root / "figs")]
    return Case(data_cli.main, argv, "--samples 500: the cleaned archive holds only 200 images")


@case("train: a .npy file as --data")
def _(p, mp):
    np.save(p.root / "images.npy", _scenes(4))
    argv = ["--data", str(p.root / "images.npy"), "--out", str(p.root / "run")]
    return Case(train_cli.main, argv, "images.npy is a single NumPy array (.npy)")


@case("final: a .csv file as --data")
def _(p, mp):
    data = p.yaml("data.csv", "id,0,1\n0,1,2\n")
    argv = ["--config", str(p.config("c.yaml")), "--data", str(data), "--out", str(p.root / "o")]
    return Case(final_stage.main, argv, "data.csv is not a NumPy .npz archive")


@case("train: all-black images")
def _(p, mp):
    scenes = _scenes(10)
    scenes[:, 0] = 0
    archive = _archive(p, "black.npz", scenes)
    argv = ["--data", str(archive), "--out", str(p.root / "run")]
    return Case(train_cli.main, argv, "images are all black (every pixel is 0)")


# --- 5. one numeric rule for every flag ----------------------------------------------------


NUMBERS = [
    (search_run.main, ["--cpus-per-trial", "nan"], "--cpus-per-trial: must be a finite number > 0"),
    (search_run.main, ["--cpus-per-trial", "-2"], "--cpus-per-trial: must be a finite number > 0"),
    (search_run.main, ["--gpus-per-trial", "inf"], "--gpus-per-trial: must be a finite number"),
    (search_run.main, ["--reduction-factor", "nan"], "--reduction-factor: must be a finite"),
    (search_run.main, ["--time-budget", "0"], "--time-budget: must be a finite number > 0"),
    (search_run.main, ["--limit-images", "0"], "--limit-images: must be an integer >= 1, got 0"),
    (search_run.main, ["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    (search_run.main, ["--num-samples", "2.5"], "--num-samples: must be an integer >= 1"),
    (search_run.main, ["--final-folds", "1"], "--final-folds: must be an integer >= 2, got 1"),
    (final_stage.main, ["--folds", "1"], "--folds: must be an integer >= 2, got 1"),
    (final_stage.main, ["--rerank-seeds", "0"], "--rerank-seeds: must be an integer >= 1"),
    (final_stage.main, ["--cpus-per-trial", "inf"], "--cpus-per-trial: must be a finite number"),
    (final_stage.main, ["--workers", "-1"], "--workers: must be an integer >= 0, got -1"),
    (compare.main, ["--seeds", "0", "-3"], "--seeds: must be an integer >= 0, got -3"),
    (compare.main, ["--max-epochs", "0"], "--max-epochs: must be an integer >= 1, got 0"),
    (export.main, ["--top-k", "0"], "--top-k: must be an integer >= 1, got 0"),
    (train_cli.main, ["--max-epochs", "-4"], "--max-epochs: must be an integer >= 1, got -4"),
    (models_cli.main, ["--repeats", "0"], "--repeats: must be an integer >= 1, got 0"),
    (data_cli.main, ["synth", "--out", "x.npz", "--n-test", "0"], "--n-test: must be an integer"),
]


@pytest.mark.parametrize(("main", "argv", "message"), NUMBERS)
def test_numbers_out_of_range_are_refused_naming_the_flag(
    main, argv, message, place, monkeypatch, capsys
):
    required = {
        final_stage.main: ["--config", str(place.config("c.yaml"))],
        compare.main: ["--candidate", "a=preset:plain", "--max-epochs", "1"],
        export.main: ["--name", "x"],
    }.get(main, [])
    monkeypatch.chdir(place.root)
    check_case(Case(main, [*required, *argv], message), place, monkeypatch, capsys)


# --- 6. nothing half-made ------------------------------------------------------------------------


def test_a_final_stopped_before_any_fold_trained_leaves_no_folds_folder(
    small_archive_path, tmp_path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield  # a generator, as train_runs is

    monkeypatch.setattr(final_stage, "train_runs", interrupted)
    from marsseg.data import load_clean_archive

    archive, _ = load_clean_archive(small_archive_path)
    config = TrainConfig.from_dict({**TINY, "augment": {"preset": "none"}})
    with pytest.raises(KeyboardInterrupt):
        final_stage.train_folds(
            config, archive, 2, tmp_path / "folds", tta=True, metric_aware=True, cpus=1, gpus=0
        )
    assert not (tmp_path / "folds").exists()


@pytest.fixture(scope="module")
def small_archive_path(tmp_path_factory):
    s = generate(n_train=40, n_test=2, seed=7, n_aliens=0)
    return save_archive(tmp_path_factory.mktemp("small") / "small.npz", s.training_set, s.test_set)


def test_sigterm_ends_a_final_like_ctrl_c_in_one_line(small_archive_path, tmp_path):
    """What a batch scheduler or a reclaimed spot node sends: one line and the exit status of a
    terminated process, not Ray's native stack dump, and no empty output folders."""
    config = TrainConfig.from_dict({**TINY, "augment": {"preset": "none"}, "max_epochs": 50})
    config.save(tmp_path / "c.yaml")
    out = tmp_path / "final"
    argv = ["--config", str(tmp_path / "c.yaml"), "--data", str(small_archive_path)]
    argv += ["--folds", "2", "--cpus-per-trial", "1", "--out", str(out)]
    driver = subprocess.Popen(
        [sys.executable, "-m", "search.final", *argv],
        env={**os.environ, **RAY_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("folds/*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)  # Ray is up and a fold has trained an epoch
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert "error: terminated (SIGTERM)" in err.splitlines(), err
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert not (out / "submission.csv").exists()


# --- 7. messages that say the truth ------------------------------------------------------------


@case("train: a YAML tab error names its line and column")
def _(p, mp):
    config = p.yaml("tab.yaml", "optim:\n\tlr: 0.1\n")
    argv = ["--config", str(config), "--out", str(p.root / "run")]
    return Case(train_cli.main, argv, "tab.yaml: not valid YAML at line 2, column 1: found")


@case("final: a folder as --config")
def _(p, mp):
    folder = p.root / "configs"
    folder.mkdir()
    argv = ["--config", str(folder), "--out", str(p.root / "o")]
    return Case(final_stage.main, argv, f"{folder} is a folder, not a config file")


@case("run: a folder as --settings")
def _(p, mp):
    folder = p.root / "settings"
    folder.mkdir()
    argv = ["--settings", str(folder)]
    return Case(search_run.main, argv, f"--settings {folder} is a folder, not a settings file")


@case("predict: a folder as --out is not a --force matter")
def _(p, mp):
    folder = p.root / "subs"
    folder.mkdir()
    argv = ["--model", str(p.model), "--data", str(p.archive), "--out", str(folder), "--force"]
    return Case(predict_stage.main, argv, f"{folder} is a folder; the submission needs a file")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_round_two_is_one_line_and_leaves_no_output(name, place, monkeypatch, capsys):
    check_case(CASES[name](place, monkeypatch), place, monkeypatch, capsys)


def test_next_steps_are_quoted_for_the_shell(tmp_path, capsys):
    """Pasted as printed, the commands get the paths back whole, spaces and non-ASCII included."""
    storage = Storage(f"{tmp_path}/my runs/é", shared=False)
    data = f"{tmp_path}/data dir/mars for students.npz"
    experiment = Experiment("x", storage, TrainConfig(), SearchSettings(data=data))

    class Summary:
        config = TrainConfig()

    search_run.print_next_steps(experiment, [Summary()])
    lines = [line.removeprefix("next:").strip() for line in capsys.readouterr().out.splitlines()]
    export_argv = shlex.split(lines[0])
    final_argv = shlex.split(lines[1])
    assert export_argv[:3] == ["python", "-m", "search.export"]
    assert export_argv[export_argv.index("--storage") + 1] == storage.flag
    assert final_argv[final_argv.index("--data") + 1] == data
    assert re.search(r"'[^']*my runs[^']*'", lines[0])
