"""Export, final training, prediction and the whole search -> export -> final chain, on CPU."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from search_helpers import RAY_ENV, search_args
from torch import nn

from marsseg.classes import CLASS_NAMES, SCORED_CLASSES
from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.data import (
    kfold_plans,
    load_archive,
    load_clean_archive,
    save_archive,
)
from marsseg.data.synthetic import generate
from marsseg.errors import DataError
from marsseg.metrics import Scores, score_masks
from marsseg.predict import (
    Ensemble,
    load_ensemble,
    load_models,
    predict_masks,
    predict_probabilities,
)
from marsseg.submission import HEADER, read_submission
from marsseg.train import fit
from search import export, tasks
from search import final as final_stage
from search import predict as predict_stage
from search.capacity import start_ray
from search.experiment import Experiment
from search.run import main as search_main


@pytest.fixture(scope="module")
def experiment(ray_env, tiny_archive, tmp_path_factory):
    storage = tmp_path_factory.mktemp("experiments")
    assert search_main(search_args(tiny_archive, storage, "f", samples=3, epochs=2)) == 0
    return storage / "f"


def test_export_writes_top_k_configs_that_load_and_train(experiment, tiny_archive, tmp_path):
    paths = export.export(Experiment.at(str(experiment)), top_k=2, arch="any", out=tmp_path)
    assert [p.name[:7] for p in paths] == ["top-01-", "top-02-"]
    best = TrainConfig.load(tmp_path / "best_config.yaml")
    assert best == TrainConfig.load(paths[0])
    assert best.provenance["val_miou"] >= TrainConfig.load(paths[1]).provenance["val_miou"]
    assert {"trial", "best_epoch", "data_checksum", "code_version"} <= set(best.provenance)
    board = pd.read_csv(tmp_path / "leaderboard.csv")  # every trial, not only the top 2
    assert len(board) == 3 and board["val_miou"].is_monotonic_decreasing
    assert (tmp_path / "timeline.csv").read_text() == (experiment / "timeline.csv").read_text()
    # The trials reported epochs, which the study and the timeline recorded: always drawable.
    assert {"intermediate.png", "timeline.png"} <= {p.name for p in (tmp_path / "plots").iterdir()}
    result = fit(best.replace(max_epochs=1), load_archive(tiny_archive), num_threads=2)
    assert result.history[0]["epoch"] == 1


def test_export_takes_a_relative_experiment_path(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(experiment.parent)
    paths = export.export(Experiment.at(experiment.name), top_k=1, arch="any", out=tmp_path)
    assert paths == [next(tmp_path.glob("top-01-*.yaml"))]


def test_export_errors_are_one_line(experiment, tmp_path, capsys):
    assert run_cli(export.main, [str(tmp_path / "nowhere")]) == 2
    assert "no search experiment at" in capsys.readouterr().err
    # The test space trains a tiny U-Net only: no MarsSeg trial to export.
    assert run_cli(export.main, [str(experiment), "--out", str(tmp_path)]) == 2
    assert "no trial of architecture 'marsseg'" in capsys.readouterr().err


TINY = {"model": {"name": "unet", "knobs": {"depth": 2, "base_channels": 8}}, "batch_size": 32}
FAST = {**TINY, "augment": {"preset": "none"}, "max_epochs": 1}
"""One epoch without offline augmentation: the fold tests check the plumbing, not the model."""


@pytest.fixture(scope="module")
def final_run(experiment, tiny_archive, tmp_path_factory):
    """A 2-fold run whose fold results are recorded as the driver receives them."""
    out = tmp_path_factory.mktemp("final")
    export.export(Experiment.at(str(experiment)), top_k=1, arch="any", out=out / "configs")
    args = ["--config", str(out / "configs" / "best_config.yaml"), "--data", str(tiny_archive)]
    args += ["--folds", "2", "--epochs", "2", "--out", str(out / "run"), "--threads", "2"]
    args += ["--cpus-per-trial", "1"]
    received = []
    as_completed = tasks.as_completed

    def recording(jobs, desc, lines=None):
        assert all(isinstance(ref, ray.ObjectRef) for ref in jobs.values())  # Ray tasks
        for key, result, reason in as_completed(jobs, desc, lines):
            received.append((key, result))
            yield key, result, reason

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "as_completed", recording)  # what train_runs collects the folds with
        assert final_stage.main(args) == 0
    return out / "run", args, received


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    """60 training and 2 test images: enough for 2 stratified folds."""
    s = generate(n_train=60, n_test=2, seed=7, n_aliens=0)
    return save_archive(tmp_path_factory.mktemp("small") / "small.npz", s.training_set, s.test_set)


def fold_args(folder, archive) -> list[str]:
    """A 2-fold run of the FAST config on `archive` into `folder / "run"`."""
    config = folder / "fast.yaml"
    TrainConfig.from_dict(FAST).save(config)
    return ["--config", str(config), "--data", str(archive), "--folds", "2"]


def test_final_folds_run_as_ray_tasks_and_predict_every_image_once(final_run, tiny_archive):
    out, _, received = final_run
    masks = load_clean_archive(tiny_archive)[0].masks
    assert sorted(key for key, _ in received) == [0, 1]
    counts = np.bincount(np.concatenate([r["val_idx"] for _, r in received]), minlength=len(masks))
    assert (counts == 1).all()
    for _, result in received:
        probs = result["probs"]
        assert probs.dtype == np.float16 and probs.shape == (len(result["val_idx"]), 5, 64, 128)
        np.testing.assert_allclose(probs.astype(np.float32).sum(axis=1), 1, atol=1e-2)
    for k in (1, 2):
        _config, models = load_models(out / "folds" / f"fold-{k}.pt")
        assert len(models) == 1


def test_final_writes_a_valid_submission(final_run, tiny_archive):
    out, *_ = final_run
    n_test = len(load_archive(tiny_archive).test_images)
    text = (out / "submission.csv").read_bytes()
    assert text.startswith(HEADER) and text.count(b"\n") == n_test + 1
    preds = read_submission(out / "submission.csv", n_rows=n_test)  # checks ids 0..M-1 in order
    assert preds.shape == (n_test, 64, 128)
    assert preds.min() >= 1 and preds.max() <= 4  # metric-aware decoding never writes class 0


def test_final_model_reloads_and_reproduces_the_submission(final_run, tiny_archive, tmp_path):
    out, *_ = final_run
    _config, models = load_models(out / "model.pt")
    assert len(models) == 2  # the two folds' models
    again = tmp_path / "again.csv"
    argv = ["--model", str(out / "model.pt"), "--data", str(tiny_archive), "--out", str(again)]
    assert predict_stage.main(argv) == 0
    assert again.read_bytes() == (out / "submission.csv").read_bytes()


def test_final_compress_and_no_tta_write_a_gzip_submission_without_flips(
    experiment, tiny_archive, tmp_path, capsys
):
    """`--no-tta` predicts the test set from the unflipped images alone. Guards against the
    flag being ignored (the submission would be the flip-averaged one)."""
    export.export(Experiment.at(str(experiment)), top_k=1, arch="any", out=tmp_path / "configs")
    args = ["--config", str(tmp_path / "configs" / "best_config.yaml"), "--data", str(tiny_archive)]
    args += ["--epochs", "1", "--out", str(tmp_path / "run"), "--threads", "2", "--compress"]
    assert final_stage.main([*args, "--no-tta"]) == 0
    assert re.search(r"^all data  epoch   1/1  loss ", capsys.readouterr().out, re.M)
    test_images = load_archive(tiny_archive).test_images
    assert not (tmp_path / "run" / "submission.csv").exists()
    preds = read_submission(tmp_path / "run" / "submission.csv.gz", n_rows=len(test_images))
    assert preds.min() >= 1 and preds.max() <= 4
    _config, models = load_models(tmp_path / "run" / "model.pt")
    np.testing.assert_array_equal(preds, predict_masks(models, test_images, tta=False))
    assert (preds != predict_masks(models, test_images, tta=True)).any()
    assert "| test-time augmentation | off |" in (tmp_path / "run" / "report.md").read_text()


def reported_iou(report: str) -> dict[str, str]:
    """Row name -> our column of the report's per-class IoU table (`mean IoU` included)."""
    table = report.split("## Per-class IoU\n\n")[1].split("\n\n")[0]
    cells = [[c.strip(" *") for c in line.strip("|").split("|")] for line in table.splitlines()]
    return {row[0]: row[1] for row in cells[2:]}


def iou_rows(scores: Scores) -> dict[str, str]:
    """What `reported_iou` should read for `scores`."""
    rows = {CLASS_NAMES[c]: f"{scores.iou[c]:.4f}" for c in SCORED_CLASSES}
    return {**rows, "mean IoU": f"{scores.mean_iou:.4f}"}


def test_final_report_and_figures(final_run, tiny_archive):
    """The per-class IoU the report gives is the out-of-fold probabilities' decoded as the
    submission is (with the stored calibration offsets), not only the reference team's."""
    out, _, received = final_run
    report = (out / "report.md").read_text()
    assert "out-of-fold (2 folds), calibrated" in report and "0.8701" in report
    masks = load_clean_archive(tiny_archive)[0].masks
    oof = np.zeros((len(masks), 5, *masks.shape[1:]), dtype=np.float16)
    for _, fold in received:
        oof[fold["val_idx"]] = fold["probs"]
    offsets = load_ensemble(out / "model.pt").offsets
    preds = final_stage.decode_probabilities(oof, metric_aware=True, offsets=offsets)
    assert reported_iou(report) == iou_rows(score_masks(preds, masks))
    assert "python -m search.final --config" in report
    assert "## Calibration" in report and "| class | IoU before | IoU after | offset |" in report
    assert "| **out-of-fold mIoU** |" in report
    for name in ("curves.png", "confusion.png", "predictions.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in report


def test_final_refuses_to_overwrite_without_force(final_run, capsys):
    _out, args, _ = final_run
    assert run_cli(final_stage.main, args) == 2
    assert "submission.csv exists; pass --force" in capsys.readouterr().err


def test_a_failed_fold_is_named_and_the_others_are_kept(
    ray_env, small_archive, tmp_path, monkeypatch, capsys
):
    train_fold = final_stage.train_fold

    def flaky(config, archive, split, **kwargs):
        if 0 in split[1]:
            raise ValueError("planted failure")
        return train_fold(config, archive, split, **kwargs)

    monkeypatch.setattr(final_stage, "train_fold", flaky)
    plans = kfold_plans(load_archive(small_archive).masks, 2, TrainConfig.from_dict(FAST).seed)
    bad = next(k for k, (_, val) in enumerate(plans) if 0 in val) + 1
    out = tmp_path / "run"
    assert run_cli(final_stage.main, [*fold_args(tmp_path, small_archive), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"fold {3 - bad}/2: best epoch 1" in captured.out  # the other fold still finished
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"fold {bad}/2 failed: ValueError: planted failure" in err[0]
    assert "1 finished fold(s) saved in" in err[0] and "no submission written" in err[0]
    _config, models = load_models(out / "folds" / f"fold-{3 - bad}.pt")
    assert len(models) == 1
    assert not (out / "folds" / f"fold-{bad}.pt").exists()
    assert not (out / "submission.csv").exists() and not (out / "model.pt").exists()


def test_stored_offsets_decode_the_submission(ray_env, small_archive, tmp_path, monkeypatch):
    real = final_stage.fit_offsets
    forced = np.array([0.0, 0.0, 0.0, 0.0, 1000.0])  # big rock wins every pixel

    def forcing(probs, masks):
        return dataclasses.replace(real(probs, masks), offsets=forced)

    monkeypatch.setattr(final_stage, "fit_offsets", forcing)
    out = tmp_path / "run"
    assert final_stage.main([*fold_args(tmp_path, small_archive), "--out", str(out)]) == 0
    n_test = len(load_archive(small_archive).test_images)
    assert (read_submission(out / "submission.csv", n_rows=n_test) == 4).all()
    np.testing.assert_array_equal(load_ensemble(out / "model.pt").offsets, forced)
    again = tmp_path / "again.csv"
    argv = ["--model", str(out / "model.pt"), "--data", str(small_archive), "--out", str(again)]
    assert predict_stage.main(argv) == 0  # search.predict decodes with the stored offsets too
    assert again.read_bytes() == (out / "submission.csv").read_bytes()
    report = (out / "report.md").read_text()
    assert "## Calibration" in report and "| +1000.00 |" in report
    # The IoU reported is that of the calibrated decoding (big rock everywhere), not the
    # uncalibrated out-of-fold scores.
    masks = load_clean_archive(small_archive)[0].masks
    assert reported_iou(report) == iou_rows(score_masks(np.full_like(masks, 4), masks))


def test_no_calibration_stores_no_offsets(ray_env, small_archive, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*fold_args(tmp_path, small_archive), "--out", str(out), "--no-calibration"]
    assert final_stage.main(args) == 0
    printed = capsys.readouterr().out
    for k in (1, 2):  # each fold's epochs as they end, then the fold
        epoch = re.search(rf"^fold {k}/2  epoch   1/1  loss .* val mIoU ", printed, re.M)
        assert epoch and epoch.start() < printed.index(f"fold {k}/2: best epoch 1, val mIoU")
    assert "out-of-fold mIoU" in printed and "calibration:" not in printed
    assert load_ensemble(out / "model.pt").offsets is None
    report = (out / "report.md").read_text()
    assert "## Calibration" not in report and "off (--no-calibration)" in report


def test_rerank_runs_every_config_and_seed_as_tasks(ray_env, small_archive, tmp_path, capsys):
    for name, lr in (("top-01-slow", 1e-5), ("top-02-fast", 3e-3)):
        config = TrainConfig.from_dict({**FAST, "optim": {"lr": lr}})
        config.replace(provenance={"trial": name}).save(tmp_path / f"{name}.yaml")
    start_ray(None, 1, 0)
    archive = load_archive(small_archive)
    best = final_stage.rerank(tmp_path / "best_config.yaml", 2, 2, archive, cpus=1, gpus=0)
    printed = capsys.readouterr().out
    means = {}
    for name in ("top-01-slow", "top-02-fast"):
        for seed in (0, 1):
            assert f"rerank {name}.yaml seed {seed}: val mIoU" in printed
        line = next(x for x in printed.splitlines() if x.startswith(f"rerank {name}.yaml: "))
        assert line.endswith("over 2 seeds") and " +- " in line
        means[name] = float(line.split("val mIoU ")[1].split()[0])
    assert best.provenance["trial"] == max(means, key=means.get)  # the best mean wins
    assert f"rerank: keeping {best.provenance['trial']}" in printed


def test_final_bad_inputs(tmp_path, capsys, tiny_archive):
    config = tmp_path / "c.yaml"
    TrainConfig().save(config)
    train_only = generate(n_train=30, n_test=1, seed=0, n_aliens=0).training_set
    no_test = save_archive(tmp_path / "train_only.npz", train_only)
    out = ["--out", str(tmp_path / "o")]
    assert run_cli(final_stage.main, ["--config", str(config), "--data", str(no_test), *out]) == 2
    assert "has no 'test_set': there is nothing to predict" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text(config.read_text().replace("schema_version: 1", "schema_version: 0"))
    assert run_cli(final_stage.main, ["--config", str(old), *out]) == 2
    assert "schema_version 0 is not supported" in capsys.readouterr().err
    model = ["--model", str(tmp_path / "missing.pt"), "--data", str(tiny_archive)]
    assert run_cli(predict_stage.main, [*model, "--out", str(tmp_path / "s.csv")]) == 2
    assert "model file not found" in capsys.readouterr().err


class _Pointwise(nn.Module):
    """A 1x1 convolution: flip-equivariant by construction."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * 4 - 2)


def test_tta_changes_nothing_for_a_flip_equivariant_model():
    images = generate(n_train=6, n_test=1, seed=2, n_aliens=0).training_set[:, 0] / 255
    model = _Pointwise()
    plain = predict_masks([model], images.astype(np.float32), tta=False)
    flipped = predict_masks([model], images.astype(np.float32), tta=True)
    np.testing.assert_array_equal(plain, flipped)


class _ColumnBiased(_Pointwise):
    """A 1x1 convolution plus a bias that runs across the columns, a different way for each
    class: not flip-equivariant, so flip TTA changes what it predicts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2, 2, x.shape[-1])
        return super().forward(x) + torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5])[:, None, None] * ramp


def test_tta_averages_the_flipped_images_predictions_flipped_back():
    """With TTA the probabilities are the mean of the image's and of its mirror image's
    (mirrored back); without, the image's alone. Guards against TTA being ignored, or its
    flipped view not flipped back, which a flip-equivariant model could not show."""
    images = generate(n_train=6, n_test=1, seed=2, n_aliens=0).training_set[:, 0] / 255
    images = images.astype(np.float32)
    model = _ColumnBiased().eval()
    with torch.no_grad():
        x = torch.from_numpy(images)[:, None]
        plain = model(x).softmax(dim=1)
        mirrored = model(x.flip(-1)).flip(-1).softmax(dim=1)
    [(_, tta)] = predict_probabilities(model, images, tta=True)
    [(_, off)] = predict_probabilities(model, images, tta=False)
    torch.testing.assert_close(off, plain)
    torch.testing.assert_close(tta, (plain + mirrored) / 2)
    assert (tta - off).abs().max() > 0.1
    masks = predict_masks([model], images, tta=True)
    assert (masks != predict_masks([model], images, tta=False)).any()


def test_search_predict_no_tta_predicts_from_the_images_alone(small_archive, tmp_path, monkeypatch):
    """`search.predict --no-tta` decodes the unflipped images' probabilities alone. Guards
    against the flag being ignored (the submission would be the flip-averaged one)."""
    model = _ColumnBiased().eval()  # its flip-averaged labels differ from its plain ones
    ensemble = Ensemble(TrainConfig.from_dict(TINY), [model], offsets=None)
    monkeypatch.setattr(predict_stage, "load_ensemble", lambda path: ensemble)
    images = load_archive(small_archive).test_images
    out = tmp_path / "s.csv"
    argv = ["--model", "model.pt", "--data", str(small_archive), "--out", str(out), "--no-tta"]
    assert predict_stage.main(argv) == 0
    preds = read_submission(out, n_rows=len(images))
    np.testing.assert_array_equal(preds, predict_masks([model], images, tta=False))
    assert (preds != predict_masks([model], images, tta=True)).any()


def test_search_with_final_runs_the_whole_chain(ray_env, tiny_archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --final writes under ./results
    args = search_args(tiny_archive, tmp_path / "experiments", "chain", samples=2, epochs=1)
    args += ["--final", "--final-arch", "any", "--final-epochs", "1"]
    assert search_main(args) == 0
    out = tmp_path / "results" / "chain"
    assert (out / "best_config.yaml").is_file()
    for name in ("submission.csv", "model.pt", "report.md", "curves.png"):
        assert (out / "final" / name).is_file(), name
    # The same command again keeps the submission it made, unless told otherwise.
    assert run_cli(search_main, args) == 2
    assert search_main([*args, "--force"]) == 0


def test_final_refuses_data_other_than_the_searched_before_training(
    small_archive, tmp_path, monkeypatch, capsys
):
    class Trained(Exception):
        """Raised where training would start: the checks before it have passed."""

    def training(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(final_stage, "fit", training)
    found = load_clean_archive(small_archive)[0].checksum()
    config = tmp_path / "best_config.yaml"
    searched = TrainConfig.from_dict(FAST).replace(provenance={"data_checksum": "0123456789abcdef"})
    searched.save(config)
    args = ["--config", str(config), "--data", str(small_archive), "--out", str(tmp_path / "o")]
    assert run_cli(final_stage.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {config} was searched on data with checksum 0123456789abcdef but --data "
        f"{small_archive} has checksum {found}; pass --any-data to train it on other data anyway"
    ]
    assert not (tmp_path / "o").exists()
    with pytest.raises(Trained):
        final_stage.main([*args, "--any-data"])
    searched.replace(provenance={"data_checksum": found}).save(config)
    with pytest.raises(Trained):
        final_stage.main(args)
    TrainConfig.from_dict(FAST).save(config)  # no provenance (hand-written): not checked
    with pytest.raises(Trained):
        final_stage.main(args)


def test_train_final_is_callable_with_a_loaded_archive_and_settings(small_archive, tmp_path):
    """Without `max_epochs` the all-data model trains for the search's best epoch scaled to
    all data (here 1 / (1 - 0.5)), as `search.run`'s printed next step runs it. Guards against
    training for the config's `max_epochs` (1) or for the unscaled best epoch."""
    archive, _ = load_clean_archive(small_archive)
    config = TrainConfig.from_dict({**FAST, "val_fraction": 0.5})
    config = config.replace(provenance={"data_checksum": "0" * 16, "best_epoch": 1})
    settings = final_stage.FinalSettings(out=tmp_path / "run", cpus=2, device="cpu")
    with pytest.raises(DataError, match="the config was searched on data with checksum 0000"):
        final_stage.train_final(config, archive, settings)
    assert not settings.out.exists()
    config = config.replace(provenance={"data_checksum": archive.checksum(), "best_epoch": 1})
    result = final_stage.train_final(config, archive, settings)
    assert result.submission == tmp_path / "run" / "submission.csv" and result.scores is None
    n_test = len(archive.test_images)
    assert read_submission(result.submission, n_rows=n_test).shape == (n_test, 64, 128)
    assert len(load_models(result.model)[1]) == 1 and result.report.is_file()
    assert result.config.max_epochs == 2 and result.config.val_fraction == 0
    assert "2 epochs (search best epoch 1 / (1 - val_fraction 0.5))" in result.report.read_text()
    with pytest.raises(DataError, match=r"submission\.csv exists; pass --force"):
        final_stage.train_final(config, archive, settings)


def test_search_with_final_checks_its_outputs_before_searching(tiny_archive, tmp_path, capsys):
    """`--final` writes under ./results/<name>: refused at once, not after the search."""
    (tmp_path / "results").write_text("a file where the results folder would go")
    args = search_args(tiny_archive, tmp_path / "experiments", "early", samples=2, epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert run_cli(search_main, [*args, "--final"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "results" in err and "a file" in err
    assert not (tmp_path / "experiments").exists()  # no search was started


def test_a_killed_final_continues_where_it_stopped_and_writes_the_same_submission(
    ray_env, small_archive, tmp_path, capsys
):
    """SIGKILL the driver after fold 1 of 2 has finished and fold 2 has run an epoch: the
    same command again keeps fold 1, continues fold 2 from its checkpoint, and writes what an
    uninterrupted run writes."""
    args = [*fold_args(tmp_path, small_archive), "--max-epochs", "4", "--cpus-per-trial", "2"]
    assert final_stage.main([*args, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    out = tmp_path / "killed"
    script = Path(__file__).with_name("interrupt_final.py")
    env = {**os.environ, **RAY_ENV}
    killed = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], env=env)
    assert killed.returncode == -signal.SIGKILL
    finished = [p.parent.name for p in (out / "folds").glob("*/result.pt")]
    running = [p.parent for p in (out / "folds").glob("*/checkpoint.pt")]
    assert len(finished) == 1 and len(running) == 1
    done_k, going_k = (1, 2) if finished[0].startswith("00-") else (2, 1)
    reached = torch.load(running[0] / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= reached < 4
    assert not (out / "submission.csv").exists()

    assert final_stage.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"fold {done_k}/2: finished earlier, kept" in printed
    assert not re.search(rf"^fold {done_k}/2  epoch", printed, re.M)  # not trained again
    epochs = [int(e) for e in re.findall(rf"^fold {going_k}/2  epoch +(\d+)/4", printed, re.M)]
    assert epochs == list(range(reached + 1, 5))  # on from the epoch it reached
    whole = (tmp_path / "whole" / "submission.csv").read_bytes()
    assert (out / "submission.csv").read_bytes() == whole
    assert (out / "model.pt").is_file()


def test_a_rerun_of_another_plan_is_refused_naming_what_differs(
    ray_env, small_archive, tmp_path, capsys
):
    out = tmp_path / "run"
    args = [*fold_args(tmp_path, small_archive), "--out", str(out), "--no-calibration"]
    store = final_stage.RunStore(out / "folds")
    config = TrainConfig.from_dict(FAST)
    plan = {"stage": "folds", "folds": 2, "config": config.to_dict(), "tta": True}
    store.open({**plan, "data_checksum": load_clean_archive(small_archive)[0].checksum()})
    store.folder(0, "fold 1/2").mkdir()
    (store.folder(0, "fold 1/2") / "checkpoint.pt").write_bytes(b"an epoch")
    for changed, named in (
        (["--folds", "3"], "folds"),
        (["--max-epochs", "2"], "config.max_epochs"),
        (["--no-tta"], "tta"),
    ):
        assert run_cli(final_stage.main, [*args, *changed]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"holds runs of another plan (it differs in {named})" in err[0]
        assert "--force to start over" in err[0]
    assert (store.folder(0, "fold 1/2") / "checkpoint.pt").read_bytes() == b"an epoch"
    assert final_stage.main([*args, "--folds", "3", "--force"]) == 0  # starts over
    assert not store.folder(0, "fold 1/2").exists()
