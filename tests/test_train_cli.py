"""`python -m marsseg.train` reruns: the same command resumes in the same folder, `--max-epochs`
extends a finished run, `--fresh` starts over without deleting anything, and what cannot continue
is refused in one line before any data is loaded."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
import torch
from train_helpers import TIMING_KEYS, small_config

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.data import save_archive
from marsseg.data.synthetic import generate
from marsseg.train.__main__ import main, parse_args

COUNTERS = TIMING_KEYS | {"finished", "stop_reason"}
"""Per-epoch values that legitimately differ between an extended run and a planned one."""


def tiny(**changes) -> TrainConfig:
    """`small_config` cut to a few steps an epoch on the 16-image archive."""
    return small_config(**{"batch_size": 4, "oversample": 1.0, **changes})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 16-image archive and a two-epoch config file named `small.yaml` next to it."""
    folder = tmp_path_factory.mktemp("data")
    s = generate(n_train=16, n_test=2, seed=5, n_aliens=0)
    save_archive(folder / "small.npz", s.training_set, s.test_set)
    tiny(max_epochs=2).save(folder / "small.yaml")
    return folder


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished two-epoch run of `small.yaml` (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(args(data, "--out", out)) == 0
    return out


def args(data, *more) -> list[str]:
    return ["--config", str(data / "small.yaml"), "--data", str(data / "small.npz")] + [
        str(arg) for arg in more
    ]


def copied(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def rows(out) -> list[dict]:
    history = pd.read_csv(out / "metrics.csv").to_dict("records")
    return [{k: v for k, v in row.items() if k not in COUNTERS} for row in history]


def test_rerunning_the_same_command_resumes_in_its_default_folder(
    data, tmp_path, monkeypatch, capsys
):
    """No `--out`: the folder is named after the config (and `--seed`), not the time, so the
    same command finds the run it started; here one killed during its second epoch."""
    monkeypatch.chdir(tmp_path)
    assert main(args(data, "--seed", 3)) == 0
    out = tmp_path / "runs" / "small-seed3"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    shutil.copy(out / "checkpoint.prev.pt", out / "checkpoint.pt")  # back to after epoch 1
    capsys.readouterr()
    assert main(args(data, "--seed", 3)) == 0
    printed = capsys.readouterr().out
    assert "resuming from runs/small-seed3/checkpoint.pt" in printed
    assert "epoch   2/2" in printed and "epoch   1/2" not in printed
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["small-seed3"]


def test_more_epochs_extend_a_finished_run_as_if_it_had_been_planned(
    data, finished, tmp_path, capsys
):
    """ReduceLROnPlateau and every epoch's reseeding do not depend on max_epochs: the extended
    run's third epoch is exactly a planned three-epoch run's. A rerun without the flag then
    keeps the run's new length rather than the config's."""
    out = copied(finished, tmp_path)
    assert main(args(data, "--out", out, "--max-epochs", 3)) == 0
    planned = tmp_path / "planned"
    assert main(args(data, "--out", planned, "--max-epochs", 3)) == 0
    assert rows(out) == rows(planned)
    assert TrainConfig.load(out / "config.yaml").max_epochs == 3
    capsys.readouterr()
    assert main(args(data, "--out", out)) == 0
    assert "keeping the run's max_epochs 3 (--max-epochs changes it)" in capsys.readouterr().out
    assert len(rows(out)) == 3


def test_more_epochs_continue_onecycle_on_the_longer_curve(data, tmp_path):
    """A finished onecycle run does not step past its curve's end: its new epochs use the lrs
    of a run planned that long (`continue_on_curve`)."""
    onecycle = tiny(scheduler={"kind": "onecycle"}).save(tmp_path / "onecycle.yaml")
    config = ["--config", str(onecycle), "--data", str(data / "small.npz")]
    out, planned = tmp_path / "run", tmp_path / "planned"
    assert main([*config, "--out", str(out), "--max-epochs", "1"]) == 0
    assert main([*config, "--out", str(out), "--max-epochs", "2"]) == 0
    assert main([*config, "--out", str(planned), "--max-epochs", "2"]) == 0
    extended, fresh = pd.read_csv(out / "metrics.csv"), pd.read_csv(planned / "metrics.csv")
    assert list(extended["epoch"]) == [1, 2]
    assert extended["lr"].iloc[1] == pytest.approx(fresh["lr"].iloc[1], rel=1e-9)


def test_fewer_epochs_than_the_run_has_run_are_refused(data, finished, tmp_path, capsys):
    out = copied(finished, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    assert run_cli(main, args(data, "--out", out, "--max-epochs", 1)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: max_epochs 1 is fewer than the 2 epochs")
    assert error.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_rerun_with_another_config_is_refused_before_the_data_is_read(
    data, finished, tmp_path, capsys
):
    out = copied(finished, tmp_path)
    tiny(max_epochs=2, optim={"lr": 1e-3}).save(tmp_path / "small.yaml")
    argv = ["--config", str(tmp_path / "small.yaml"), "--data", str(tmp_path / "absent.npz")]
    assert run_cli(main, [*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "another config (it differs in optim.lr)" in error and "--fresh" in error


def test_the_same_config_exported_again_continues_the_run(data, finished, tmp_path):
    """Provenance says where a config came from, not what a run trains: an export of the same
    trial again (new time stamp, new code version) continues the run instead of refusing it."""
    out = copied(finished, tmp_path)
    again = tiny(max_epochs=2, provenance={"trial": "t1", "exported": "later", "code_version": "2"})
    again.save(tmp_path / "again.yaml")
    argv = ["--config", str(tmp_path / "again.yaml"), "--data", str(data / "small.npz")]
    assert main([*argv, "--out", str(out), "--max-epochs", "3"]) == 0
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2, 3]


def test_an_early_stopped_run_is_not_reopened_by_more_epochs(data, tmp_path, capsys):
    """Early stopping with patience 1 and an unreachable min_delta ends the run at epoch 2."""
    stopping = tiny(early_stopping={"patience": 1, "min_delta": 1.0}).save(tmp_path / "s.yaml")
    config = ["--config", str(stopping), "--data", str(data / "small.npz")]
    out = tmp_path / "run"
    assert main([*config, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*config, "--out", str(out), "--max-epochs", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} stopped early at epoch 2: more epochs do not reopen it" in printed
    assert "--fresh" in printed and "epoch   3/" not in printed
    assert TrainConfig.load(out / "config.yaml").max_epochs == 3


def test_fresh_moves_the_old_run_aside_and_starts_over(data, finished, tmp_path, capsys):
    out = copied(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    old_model = (out / "model.pt").read_bytes()
    assert main(args(data, "--out", out, "--max-epochs", 1, "--fresh")) == 0
    printed = capsys.readouterr().out
    (aside,) = out.glob("replaced-*")
    assert f"--fresh: moved the previous run's files to {aside}" in printed
    assert "epoch   1/1" in printed and "resuming" not in printed
    assert sorted(p.name for p in aside.iterdir()) == sorted(p.name for p in finished.iterdir())
    assert (aside / "model.pt").read_bytes() == old_model
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint.pt").is_file()


def test_flags_share_the_other_entry_points_names_and_keep_the_old_ones(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-epochs" in text and "--cpus-per-trial" in text and "--fresh" in text
    assert "(default: None)" not in text and not re.search(r"\(default[^)]*\(default", text)
    old = parse_args(["--epochs", "4", "--threads", "2"])
    assert (old.max_epochs, old.cpus_per_trial) == (4, 2.0)
