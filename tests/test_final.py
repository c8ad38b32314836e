"""Export, final training, prediction and the whole search -> export -> final chain, on CPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from search_helpers import search_args
from torch import nn

from marsseg.cli import run_cli
from marsseg.config import TrainConfig
from marsseg.data import archive_from_arrays, load_archive, save_archive
from marsseg.data.synthetic import generate
from marsseg.metrics import score_masks
from marsseg.predict import load_models, predict_masks
from marsseg.submission import HEADER, read_submission
from marsseg.train import fit
from search import export
from search import final as final_stage
from search import predict as predict_stage
from search.run import main as search_main


@pytest.fixture(scope="module")
def experiment(ray_env, tiny_archive, tmp_path_factory):
    storage = tmp_path_factory.mktemp("experiments")
    assert search_main(search_args(tiny_archive, storage, "f", samples=3, epochs=2)) == 0
    return storage / "f"


def test_export_writes_top_k_configs_that_load_and_train(experiment, tiny_archive, tmp_path):
    paths = export.export(str(experiment), top_k=2, arch="any", out=tmp_path)
    assert [p.name[:7] for p in paths] == ["top-01-", "top-02-"]
    best = TrainConfig.load(tmp_path / "best_config.yaml")
    assert best == TrainConfig.load(paths[0])
    assert best.provenance["val_miou"] >= TrainConfig.load(paths[1]).provenance["val_miou"]
    assert {"trial", "best_epoch", "data_checksum", "code_version"} <= set(best.provenance)
    board = pd.read_csv(tmp_path / "leaderboard.csv")  # every trial, not only the top 2
    assert len(board) == 3 and board["val_miou"].is_monotonic_decreasing
    assert (tmp_path / "timeline.csv").read_text() == (experiment / "timeline.csv").read_text()
    result = fit(best.replace(max_epochs=1), load_archive(tiny_archive), num_threads=2)
    assert result.history[0]["epoch"] == 1


def test_export_takes_a_relative_experiment_path(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(experiment.parent)
    paths = export.export(experiment.name, top_k=1, arch="any", out=tmp_path)
    assert paths == [next(tmp_path.glob("top-01-*.yaml"))]


def test_export_errors_are_one_line(experiment, tmp_path, capsys):
    assert run_cli(export.main, [str(tmp_path / "nowhere")]) == 2
    assert "no search experiment at" in capsys.readouterr().err
    # The test space trains a tiny U-Net only: no MarsSeg trial to export.
    assert run_cli(export.main, [str(experiment), "--out", str(tmp_path)]) == 2
    assert "no trial of architecture 'marsseg'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def final_run(experiment, tiny_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("final")
    export.export(str(experiment), top_k=1, arch="any", out=out / "configs")
    args = ["--config", str(out / "configs" / "best_config.yaml"), "--data", str(tiny_archive)]
    args += ["--folds", "2", "--epochs", "2", "--out", str(out / "run"), "--threads", "2"]
    assert final_stage.main(args) == 0
    return out / "run", args


def test_final_writes_a_valid_submission(final_run, tiny_archive):
    out, _ = final_run
    n_test = len(load_archive(tiny_archive).test_images)
    text = (out / "submission.csv").read_bytes()
    assert text.startswith(HEADER) and text.count(b"\n") == n_test + 1
    preds = read_submission(out / "submission.csv", n_rows=n_test)  # checks ids 0..M-1 in order
    assert preds.shape == (n_test, 64, 128)
    assert preds.min() >= 1 and preds.max() <= 4  # metric-aware decoding never writes class 0


def test_final_model_reloads_and_reproduces_the_submission(final_run, tiny_archive, tmp_path):
    out, _ = final_run
    _config, models = load_models(out / "model.pt")
    assert len(models) == 2  # the two folds' models
    again = tmp_path / "again.csv"
    argv = ["--model", str(out / "model.pt"), "--data", str(tiny_archive), "--out", str(again)]
    assert predict_stage.main(argv) == 0
    assert again.read_bytes() == (out / "submission.csv").read_bytes()


def test_final_compress_writes_a_gzip_submission(experiment, tiny_archive, tmp_path):
    export.export(str(experiment), top_k=1, arch="any", out=tmp_path / "configs")
    args = ["--config", str(tmp_path / "configs" / "best_config.yaml"), "--data", str(tiny_archive)]
    args += ["--epochs", "1", "--out", str(tmp_path / "run"), "--threads", "2", "--compress"]
    assert final_stage.main(args) == 0
    n_test = len(load_archive(tiny_archive).test_images)
    assert not (tmp_path / "run" / "submission.csv").exists()
    preds = read_submission(tmp_path / "run" / "submission.csv.gz", n_rows=n_test)
    assert preds.min() >= 1 and preds.max() <= 4


def test_final_report_and_figures(final_run):
    out, _ = final_run
    report = (out / "report.md").read_text()
    assert "out-of-fold (2 folds)" in report and "0.8701" in report and "0.2032" in report
    assert "python -m search.final --config" in report
    for name in ("curves.png", "confusion.png", "predictions.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in report


def test_final_refuses_to_overwrite_without_force(final_run, capsys):
    _out, args = final_run
    assert run_cli(final_stage.main, args) == 2
    assert "submission.csv exists; pass --force" in capsys.readouterr().err


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


def test_tta_helps_or_keeps_miou_on_synthetic_validation(tmp_path):
    s = generate(n_train=240, n_test=1, seed=6, n_aliens=0)
    archive = archive_from_arrays(s.training_set, s.test_set)
    config = TrainConfig.from_dict(
        {
            "model": {"name": "unet", "knobs": {"depth": 2, "base_channels": 8}},
            "augment": {"preset": "none"},
            "optim": {"lr": 3e-3},
            "batch_size": 16,
            "max_epochs": 6,
        }
    )
    result = fit(config, archive, num_threads=2, cache_dir=tmp_path)
    from marsseg.data import train_val_split

    _, val = train_val_split(archive.masks, config.val_fraction, config.seed)
    images, masks = archive.images[val], archive.masks[val]
    plain = score_masks(predict_masks([result.model], images, tta=False), masks).mean_iou
    tta = score_masks(predict_masks([result.model], images, tta=True), masks).mean_iou
    assert plain > 0.3  # the model learned something, so the comparison means something
    assert tta >= plain, (tta, plain)


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
