"""`search.compare`: each candidate retrained with several seeds on one split, then summarised."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from search import compare, tasks

TINY = {"model": {"name": "unet", "knobs": {"depth": 2, "base_channels": 8}}, "batch_size": 32}


@pytest.fixture(scope="module")
def compared(ray_env, tiny_archive, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    slow, fast = folder / "slow.yaml", folder / "fast.yaml"
    TrainConfig.from_dict({**TINY, "optim": {"lr": 1e-5}}).save(slow)
    TrainConfig.from_dict({**TINY, "optim": {"lr": 3e-3}}).save(fast)
    argv = ["--data", str(tiny_archive), "--epochs", "2", "--seeds", "0", "1"]
    argv += ["--candidate", f"slow={slow}", "--candidate", f"fast={fast}"]
    argv += ["--out", str(folder / "out"), "--cpus-per-trial", "1"]
    assert compare.main(argv) == 0
    return folder / "out"


def test_every_candidate_runs_every_seed_within_the_budget(compared):
    runs = pd.read_csv(compared / "runs.csv")
    assert sorted(zip(runs["candidate"], runs["seed"], strict=True)) == [
        ("fast", 0), ("fast", 1), ("slow", 0), ("slow", 1)
    ]  # fmt: skip
    assert runs["epochs_run"].max() <= 2
    assert runs["val_miou"].between(0, 1).all()
    # Different seeds are different runs, not one run counted twice.
    assert runs.groupby("candidate")["val_miou"].nunique().min() == 2


def test_summary_keeps_candidate_order_and_measures_the_gain(compared):
    summary = pd.read_csv(compared / "comparison.csv")
    assert list(summary["candidate"]) == ["slow", "fast"]
    assert (summary["seeds"] == 2).all()
    assert (summary["val_miou_std"] > 0).all()
    text = (compared / "comparison.md").read_text()
    gain = summary["val_miou_mean"][1] - summary["val_miou_mean"][0]
    assert f"{gain:+.4f}" in text
    assert "python -m search.compare" in text and "at most 2 epochs" in text


def test_a_failed_run_is_named_and_a_rerun_continues_it(
    ray_env, tiny_archive, tmp_path, monkeypatch, capsys
):
    """Runs of one candidate fail after their first epoch: the others finish and are kept;
    the same command again keeps the finished runs and goes on from the failed runs' epoch."""
    bad_lr, planted = 2e-3, tmp_path / "planted"
    planted.touch()
    train_one = tasks.train_one

    def flaky(config, archive, split, *, on_epoch, **kwargs):
        def failing(metrics, state):
            on_epoch(metrics, state)  # the epoch's checkpoint is written: then it fails
            if config.optim.lr == bad_lr and planted.exists():
                raise ValueError("planted failure")

        return train_one(config, archive, split, on_epoch=failing, **kwargs)

    monkeypatch.setattr(tasks, "train_one", flaky)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    TrainConfig.from_dict({**TINY, "optim": {"lr": 3e-3}}).save(good)
    TrainConfig.from_dict({**TINY, "optim": {"lr": bad_lr}}).save(bad)
    out = tmp_path / "out"
    argv = ["--data", str(tiny_archive), "--max-epochs", "2", "--seeds", "0", "1"]
    argv += ["--candidate", f"bad={bad}", "--candidate", f"good={good}", "--out", str(out)]
    assert run_cli(compare.main, argv) == 2
    captured = capsys.readouterr()
    for seed in (0, 1):  # each finished run's epochs and result, as they came
        assert re.search(rf"^good seed {seed}  epoch   2/2  loss ", captured.out, re.M)
        assert f"good seed {seed}: val mIoU" in captured.out
        assert f"bad seed {seed} failed: ValueError: planted failure" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "bad seed 0 failed" in err[0] and "bad seed 1 failed" in err[0]
    runs = pd.read_csv(out / "runs.csv")
    assert list(zip(runs["candidate"], runs["seed"], strict=True)) == [("good", 0), ("good", 1)]
    assert list(pd.read_csv(out / "comparison.csv")["candidate"]) == ["good"]
    assert "- left out: bad: no run finished" in (out / "comparison.md").read_text()

    planted.unlink()
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    for seed in (0, 1):
        assert f"good seed {seed}: finished earlier, kept" in printed
        assert not re.search(rf"^good seed {seed}  epoch", printed, re.M)
        assert not re.search(rf"^bad seed {seed}  epoch   1/2", printed, re.M)
        assert re.search(rf"^bad seed {seed}  epoch   2/2", printed, re.M)
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(zip(runs["candidate"], runs["seed"], strict=True)) == [
        ("bad", 0), ("bad", 1), ("good", 0), ("good", 1)
    ]  # fmt: skip
    assert (runs["epochs_run"] == 2).all()

    assert run_cli(compare.main, [*argv, "--seeds", "0", "1", "2"]) == 2
    assert "holds runs of another plan (it differs in seeds)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--candidate", "x"], "--candidate must be NAME=preset:NAME or NAME=CONFIG.yaml"),
        (["--candidate", "x=nowhere.yaml"], "no config file 'nowhere.yaml'"),
        (["--candidate", "x=preset:nope"], "unknown preset 'nope'"),
        (["--candidate", "x=preset:reference", "--seeds", "1", "1"], "repeats a seed"),
        (
            ["--candidate", "x=preset:reference", "--val-fraction", "1"],
            "argument --val-fraction: must be a finite number > 0 and < 1, got 1.0",
        ),
        (
            ["--candidate", "x=preset:reference", "--candidate", "x=preset:reference"],
            "names must differ",
        ),
    ],
)
def test_bad_arguments_are_one_line(argv, message, capsys):
    assert run_cli(compare.main, [*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
