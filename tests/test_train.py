"""The trainer on small synthetic data and small models: learning, callbacks, schedules, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_helpers import resumed_after, small_config, without_timing

from marsseg.config import TrainConfig
from marsseg.data import archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.errors import CheckpointError, ConfigError
from marsseg.losses import CombinedLoss
from marsseg.metrics import score_masks
from marsseg.predict import load_models, predict_masks
from marsseg.train import EPOCH_METRICS, evaluate, fit, prepare_data
from marsseg.train.__main__ import main as train_main
from marsseg.train.batches import Batches
from marsseg.train.loop import _track_best, train_epoch
from marsseg.train.state import EpochState, read_checkpoint


@pytest.fixture(scope="module")
def small_archive():
    """160 synthetic training images (7 aliens kept: they are harmless here) and 8 test images."""
    s = generate(n_train=160, n_test=8, seed=3)
    return archive_from_arrays(s.training_set, s.test_set)


def run(config, archive, tmp_path, **kwargs):
    history = []
    result = fit(
        config,
        archive,
        on_epoch=lambda metrics, state: history.append(dict(metrics)),
        cache_dir=tmp_path / "cache",
        num_threads=2,
        **kwargs,
    )
    return result, history


def test_short_run_beats_the_untrained_model_and_reports_everything(small_archive, tmp_path):
    config = small_config(max_epochs=4, augment={"preset": "reference"})
    data = prepare_data(config, small_archive, tmp_path / "cache")
    torch.manual_seed(config.seed)
    untrained = evaluate(config.model.build(), CombinedLoss(config.loss), data, torch.device("cpu"))
    result, history = run(config, data, tmp_path)
    assert len(history) == 4 and [m["epoch"] for m in history] == [1, 2, 3, 4]
    for metrics in history:
        assert set(EPOCH_METRICS) <= set(metrics), set(EPOCH_METRICS) - set(metrics)
        assert all(math.isfinite(metrics[k]) for k in ("train_loss", "val_loss", "val_miou"))
    assert [m["finished"] for m in history] == [False, False, False, True]
    assert history[-1]["stop_reason"] == "max_epochs"
    assert result.best_score == max(m["val_miou"] for m in history)
    assert result.best_score > untrained[1].mean_iou + 0.15


def test_validation_scores_what_prediction_predicts(small_archive, tmp_path):
    """Validation and `predict_masks` run one inference function: the same model scores the
    same on the same images, and `fit`'s best score is what its returned model predicts."""
    config = small_config(max_epochs=1)
    data = prepare_data(config, small_archive, tmp_path / "cache")
    result = fit(config, data, num_threads=2)
    loss, scores = evaluate(result.model, CombinedLoss(config.loss), data, torch.device("cpu"))
    predicted = score_masks(
        predict_masks([result.model], data.val_images, tta=False), data.val_masks
    )
    assert math.isfinite(loss)
    assert scores.mean_iou == predicted.mean_iou == result.best_score
    np.testing.assert_array_equal(scores.iou, predicted.iou)
    np.testing.assert_array_equal(scores.confusion, predicted.confusion)


def test_same_seed_same_metrics_on_cpu(small_archive, tmp_path):
    config = small_config(max_epochs=2, augment={"preset": "none", "intensity": 0.5})
    first = without_timing(run(config, small_archive, tmp_path)[1])
    second = without_timing(run(config, small_archive, tmp_path)[1])
    assert first == second
    other = without_timing(run(config.replace(seed=1), small_archive, tmp_path)[1])
    assert other != first


def test_online_augmentation_changes_the_batches_and_draws_anew_each_epoch(small_archive, tmp_path):
    """What `fit` trains on: `intensity` augments every image, `photometric` adds its ops, and
    each epoch draws new augmentations (a rerun of an epoch the same ones); `random_flip` flips
    some images with their masks. Guards against the online pipeline being off in the batch
    loader, re-seeded alike every epoch, and the random flip being skipped."""
    plan = np.arange(32)  # two batches of 16, in plan order

    def batches(epoch: int, **augment) -> tuple[torch.Tensor, torch.Tensor]:
        config = small_config(val_fraction=0.0, augment={"preset": "none", **augment})
        data = prepare_data(config, small_archive, tmp_path / "cache")
        drawn = list(Batches(data, config, torch.device("cpu"), workers=0).epoch(plan, epoch))
        return torch.cat([b[0][:, 0] for b in drawn]), torch.cat([b[1] for b in drawn])

    def changed(a: torch.Tensor, b: torch.Tensor) -> int:
        return sum(not torch.equal(x, y) for x, y in zip(a, b, strict=True))

    raw_images, raw_masks = batches(0)
    assert torch.equal(raw_images, torch.from_numpy(small_archive.images[plan]))
    first, again, second = (batches(e, intensity=0.5)[0] for e in (0, 0, 1))
    assert changed(first, raw_images) == len(plan)
    assert torch.equal(first, again)
    assert changed(first, second) == len(plan)
    assert changed(batches(0, intensity=0.5, photometric=True)[0], first) == len(plan)

    torch.manual_seed(0)  # `fit` seeds torch every epoch; the flip draws from it
    images, masks = batches(0, random_flip=True)
    flipped = [torch.equal(i, r.flip(-1)) for i, r in zip(images, raw_images, strict=True)]
    assert 0 < sum(flipped) < len(plan)
    for i, flip in enumerate(flipped):
        assert torch.equal(images[i], raw_images[i].flip(-1) if flip else raw_images[i])
        assert torch.equal(masks[i], raw_masks[i].flip(-1) if flip else raw_masks[i])


def test_fit_asks_the_batch_loader_for_each_epoch_by_its_index(
    small_archive, tmp_path, monkeypatch
):
    """`fit` must hand every epoch's index to the loader, which seeds that epoch's online
    augmentation from it: a loop that passed a fixed epoch would redraw epoch 0's every time."""
    asked = []
    epoch = Batches.epoch

    def recording(self, plan, index):
        asked.append(index)
        return epoch(self, plan, index)

    monkeypatch.setattr(Batches, "epoch", recording)
    config = small_config(max_epochs=3, val_fraction=0.0, augment={"preset": "none"})
    fit(config, small_archive.subset(np.arange(16)), num_threads=1, cache_dir=tmp_path)
    assert asked == [0, 1, 2]


def test_resume_after_epoch_two_matches_an_uninterrupted_run(small_archive, tmp_path):
    # Online augmentation and the boundary ramp make every epoch depend on more than weights.
    config = small_config(
        max_epochs=4,
        augment={"preset": "reference", "intensity": 0.4},
        loss={"ce_weight": 1.0, "boundary_weight": 0.1, "boundary_ramp": 0.05},
    )
    _, uninterrupted = run(config, small_archive, tmp_path)
    resumed = resumed_after(config, small_archive, tmp_path, epoch=2)
    assert [m["epoch"] for m in resumed] == [3, 4]
    assert without_timing(resumed) == without_timing(uninterrupted[2:])


def test_resume_refuses_a_checkpoint_of_another_config(small_archive, tmp_path):
    config = small_config(max_epochs=1)
    checkpoint = tmp_path / "ckpt.pt"
    fit(config, small_archive, on_epoch=lambda m, s: s.save(checkpoint), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        fit(config.replace(seed=9), small_archive, checkpoint=checkpoint, cache_dir=tmp_path)


def test_early_stopping_acts_on_val_miou(small_archive, tmp_path):
    # No improvement ever counts (min_delta 1): the run stops after `patience` bad epochs.
    config = small_config(max_epochs=10, early_stopping={"patience": 2, "min_delta": 1.0})
    result, history = run(config, small_archive, tmp_path)
    assert len(history) == 3 and result.stop_reason == "early_stopping"
    assert history[-1]["finished"] and history[-1]["stop_reason"] == "early_stopping"
    assert not any(m["finished"] for m in history[:-1])
    # The best weights are kept even though no improvement was large enough to count.
    assert result.best_epoch == int(np.argmax([m["val_miou"] for m in history])) + 1


def test_patience_counts_gains_under_min_delta_as_bad_and_the_best_weights_are_a_copy():
    """Scripted scores: a gain of at most `min_delta` is a bad epoch for patience but still
    becomes the best, whose weights are a snapshot, not the live parameters."""
    config = small_config(early_stopping={"patience": 2, "min_delta": 0.01})
    model = torch.nn.Linear(2, 2)
    state = EpochState(config, model, optimizer=None, scheduler=None)
    stops = []
    for epoch, score in enumerate([0.50, 0.505, 0.60, 0.605, 0.609]):
        state.epoch = epoch
        with torch.no_grad():
            model.weight.fill_(score)
        stops.append(_track_best(state, score, config))
    assert stops == ["", "", "", "", "early_stopping"]
    assert (state.best_score, state.best_epoch) == (0.609, 5)
    with torch.no_grad():
        model.weight.fill_(0.0)
    assert torch.all(state.best_weights["weight"] == 0.609)


def test_reduce_lr_on_plateau_follows_val_miou(small_archive, tmp_path):
    config = small_config(
        max_epochs=6, optim={"lr": 3e-2}, scheduler={"factor": 0.5, "patience": 0, "min_lr": 0}
    )
    _, history = run(config, small_archive, tmp_path)
    best, lr = -math.inf, 3e-2
    for metrics in history:
        # ReduceLROnPlateau(mode="max", threshold=1e-4 relative): halve on no improvement.
        if metrics["val_miou"] > best * (1 + 1e-4):
            best = metrics["val_miou"]
        else:
            lr *= 0.5
        assert metrics["lr"] == pytest.approx(lr)
    assert history[-1]["lr"] < 3e-2  # the plateau did happen in this run


def test_train_on_all_data_without_validation(small_archive, tmp_path):
    result, history = run(small_config(max_epochs=2, val_fraction=0.0), small_archive, tmp_path)
    assert "val_miou" not in history[-1] and history[-1]["finished"]
    assert result.best_epoch == 0


def test_cli_trains_the_reference_preset_and_resumes(tmp_path, capsys):
    s = generate(n_train=48, n_test=4, seed=4)
    from marsseg.data import save_archive

    archive = save_archive(tmp_path / "tiny.npz", s.training_set, s.test_set)
    out = tmp_path / "run"
    args = ["--preset", "reference", "--data", str(archive), "--out", str(out), "--epochs", "1"]
    assert train_main([*args, "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "val mIoU" in printed and "big_rock" in printed
    for name in ("config.yaml", "metrics.csv", "checkpoint.pt", "model.pt"):
        assert (out / name).is_file()
    assert TrainConfig.load(out / "config.yaml").max_epochs == 1
    config, (model,) = load_models(out / "model.pt")
    assert config.model.name == "marsseg"
    assert model(torch.zeros(1, 1, 64, 128)).shape == (1, 5, 64, 128)
    # The same command again finds the finished checkpoint and trains no more.
    assert train_main(args) == 0
    assert "resuming from" in capsys.readouterr().out


def test_deep_supervision_trains_the_coarse_stage_on_its_own_loss(labelled_batch):
    """hunet's `deep_supervision` loss is part of what a training step descends, not only of
    the loss it reports: one step from the same weights moves the coarse stage differently
    with it than without. Guards against the loop adding the auxiliary loss detached."""
    images, masks = labelled_batch
    knobs = {"stages": 2, "depth": 2, "coarse_channels": 8, "refine_channels": 8}
    coarse, losses = [], []
    for weight in (0.0, 1.0):
        model_config = {"name": "hunet", "knobs": {**knobs, "deep_supervision": weight}}
        config = small_config(model=model_config)
        torch.manual_seed(0)
        model = config.model.build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, _, _ = train_epoch(
            model, CombinedLoss(config.loss), optimizer, iter([(images, masks, None)]), 0, None
        )
        losses.append(loss)
        coarse.append(model.stages[0].classifier.weight.detach().clone())
    assert losses[1] > losses[0]
    assert not torch.allclose(coarse[1], coarse[0], rtol=0, atol=1e-4)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_cli_falls_back_past_a_damaged_checkpoint_then_to_scratch(tmp_path, capsys):
    """checkpoint.pt unreadable: the rerun resumes from checkpoint.prev.pt (the epoch before),
    saying so; both unreadable: it starts from scratch, saying so."""
    from marsseg.data import save_archive

    s = generate(n_train=64, n_test=4, seed=4)
    archive = save_archive(tmp_path / "small.npz", s.training_set, s.test_set)
    small_config(max_epochs=2).save(tmp_path / "small.yaml")
    out = tmp_path / "run"
    args = ["--config", str(tmp_path / "small.yaml"), "--data", str(archive), "--out", str(out)]
    args += ["--threads", "2"]
    assert train_main(args) == 0
    capsys.readouterr()
    latest, previous = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    assert torch.load(previous, weights_only=True)["epoch"] == 1
    _truncate(latest)
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint {latest} cannot be read" in printed
    assert f"resumed from the older checkpoint {previous} (epoch 1)" in printed
    assert "epoch   2/2" in printed and "epoch   1/2" not in printed
    assert torch.load(latest, weights_only=True)["epoch"] == 2  # the damaged file is replaced
    assert torch.load(previous, weights_only=True)["epoch"] == 1

    _truncate(latest)
    _truncate(previous)
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "no readable checkpoint (2 damaged): starting from scratch" in printed
    assert "epoch   1/2" in printed and "epoch   2/2" in printed
    assert torch.load(latest, weights_only=True)["epoch"] == 2
    assert torch.load(previous, weights_only=True)["epoch"] == 1


def test_loading_a_damaged_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read"):
        read_checkpoint(path)
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="lacks config, model"):
        read_checkpoint(path)
