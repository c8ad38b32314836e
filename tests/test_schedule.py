"""LR schedules stepped per batch and the weight average: curves, step counts, BatchNorm, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_helpers import resumed_after, small_config, without_timing

from marsseg.config import TrainConfig, preset
from marsseg.data import archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.errors import ConfigError
from marsseg.losses import CombinedLoss
from marsseg.train import evaluate, fit, prepare_data
from marsseg.train.schedule import (
    build_ema,
    build_scheduler,
    continue_on_curve,
    total_steps,
    warmup_cosine,
)

LR = 3e-3


@pytest.fixture(scope="module")
def small_archive():
    s = generate(n_train=120, n_test=4, seed=7, n_aliens=0)
    return archive_from_arrays(s.training_set, s.test_set)


def config(**changes) -> TrainConfig:
    """The trainer tests' small U-Net at lr LR, without oversampling unless a test asks."""
    return small_config(**{"optim": {"lr": LR}, "oversample": 1.0, **changes})


def lrs_over(schedule: dict, steps: int) -> list[float]:
    """The lr each of `steps` optimiser steps uses, stepping the scheduler after each."""
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = build_scheduler(config(scheduler=schedule).scheduler, optimizer, steps)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    used.append(optimizer.param_groups[0]["lr"])  # what the run reports after its last step
    return used


def test_onecycle_rises_from_lr_over_25_to_the_peak_then_anneals_to_its_floor():
    steps, warmup = 100, 0.3
    used = lrs_over({"kind": "onecycle", "warmup_fraction": warmup}, steps)
    # OneCycleLR over steps + 1 points with cosine annealing, written out independently.
    points = steps + 1
    peak_step = warmup * points - 1
    low, high, floor = LR / 25, LR, LR / 25 / 1e4
    for step, lr in enumerate(used):
        if step <= peak_step:
            start, end, pct = low, high, step / peak_step
        else:
            start, end, pct = high, floor, (step - peak_step) / (points - 1 - peak_step)
        expected = end + (start - end) / 2 * (1 + math.cos(math.pi * pct))
        assert lr == pytest.approx(expected, rel=1e-6), step
    assert used[0] == pytest.approx(LR / 25)
    assert max(used) == pytest.approx(LR, rel=1e-3)
    assert used[-1] == pytest.approx(floor)


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    steps, min_lr = 200, 1e-5
    used = lrs_over({"kind": "cosine", "warmup_fraction": 0.1, "min_lr": min_lr}, steps)
    assert used[0] == pytest.approx(LR / 25)
    assert used[10] == pytest.approx(LR / 25 + (LR - LR / 25) * 10 / 20)  # halfway up
    assert used[20] == pytest.approx(LR)  # warmup ends at 10% of 200 steps
    assert np.all(np.diff(used[:21]) > 0) and np.all(np.diff(used[20:]) <= 0)
    middle = 20 + (steps - 1 - 20) / 2
    assert warmup_cosine(middle, steps=steps, warmup=20, floor=min_lr / LR) == pytest.approx(
        (1 + min_lr / LR) / 2
    )
    assert used[steps - 1] == pytest.approx(min_lr) and used[-1] == pytest.approx(min_lr)


def test_constant_keeps_the_lr():
    assert lrs_over({"kind": "constant"}, 20) == [LR] * 21


def test_the_schedule_spans_exactly_the_runs_steps(small_archive, tmp_path):
    # A fractional oversampling rate makes epochs differ in length; the count must still match.
    cfg = config(oversample=3.5, scheduler={"kind": "onecycle"}, max_epochs=3)
    data = prepare_data(cfg, small_archive, tmp_path)
    steps = []
    result = fit(cfg, data, on_epoch=lambda m, s: steps.append(s.scheduler.last_epoch))
    assert steps[-1] == total_steps(cfg, data.has_big_rock)
    assert len(set(np.diff([0, *steps]))) > 1  # the epochs did differ in length
    assert result.history[-1]["lr"] == pytest.approx(LR / 25 / 1e4)


def test_fit_reports_the_onecycle_lr_at_each_epochs_end(small_archive, tmp_path):
    cfg = config(scheduler={"kind": "onecycle"}, max_epochs=4)
    per_epoch = len(prepare_data(cfg, small_archive, tmp_path).train_images) // cfg.batch_size
    history = fit(cfg, small_archive, cache_dir=tmp_path).history
    expected = lrs_over({"kind": "onecycle"}, 4 * per_epoch)
    assert [m["lr"] for m in history] == pytest.approx(expected[per_epoch::per_epoch])


def test_plateau_is_still_the_default_and_is_stepped_per_epoch_not_per_batch():
    plateau = TrainConfig().scheduler
    assert plateau.kind == "plateau" and not plateau.per_batch
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = build_scheduler(plateau, optimizer, steps=0)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.factor, scheduler.patience, scheduler.mode) == (0.5, 5, "max")


def test_bad_schedule_or_ema_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"scheduler\.kind must be one of plateau, onecycle"):
        config(scheduler={"kind": "step"})
    with pytest.raises(ConfigError, match=r"scheduler\.warmup_fraction"):
        config(scheduler={"kind": "cosine", "warmup_fraction": 1.0})
    with pytest.raises(ConfigError, match="ema_decay must be 0"):
        config(ema_decay=1.0)


def test_ema_follows_the_model_with_warmup_and_averages_batchnorm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = build_ema(model, 0.9)
    decays = []
    for n in range(30):
        before = [p.detach().clone() for p in ema.module.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(4, 1, 3, 3) + 5)  # train mode: BatchNorm's running mean moves
        ema.update_parameters(model)
        if n:  # the first update copies the model
            after, current = next(ema.module.parameters()), next(model.parameters())
            decays.append(float(((current - after) / (current - before[0])).mean().detach()))
    # beta = min(0.9, (1 + n) / (10 + n)) with n updates done before: 2/11, 3/12, ... then 0.9.
    expected = [min(0.9, (1 + n) / (10 + n)) for n in range(1, 30)]
    assert decays == pytest.approx(expected, rel=1e-4)
    bn_ema, bn = ema.module[1], model[1]
    assert not torch.equal(bn_ema.running_mean, torch.zeros(2))  # not the initial statistics
    assert not torch.equal(bn_ema.running_mean, bn.running_mean)  # but their average
    assert int(bn_ema.num_batches_tracked) == int(bn.num_batches_tracked)


def test_ema_is_what_is_validated_and_returned_and_differs_from_the_raw_weights(
    small_archive, tmp_path
):
    """Guards against an average that is never updated: it stays a copy of the initial
    weights, which also differs from the raw ones, so every weight must have moved."""
    cfg = config(ema_decay=0.9, scheduler={"kind": "onecycle"})
    torch.manual_seed(cfg.seed)  # as `fit` builds its model
    initial = cfg.model.build().state_dict()
    raw = {}
    result = fit(
        cfg,
        small_archive,
        cache_dir=tmp_path,
        on_epoch=lambda m, s: raw.update(
            {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        ),
    )
    returned = result.model.state_dict()
    assert any(not torch.equal(returned[k], raw[k]) for k in raw if raw[k].is_floating_point())
    moved = [not torch.equal(returned[k], initial[k]) for k in raw if raw[k].is_floating_point()]
    assert all(moved), f"{moved.count(False)} of {len(moved)} averaged tensors never moved"
    data = prepare_data(cfg, small_archive, tmp_path)
    criterion = CombinedLoss(cfg.loss)
    _, scores = evaluate(result.model, criterion, data, torch.device("cpu"))
    assert scores.mean_iou == pytest.approx(result.best_score)


def test_ema_and_onecycle_resume_exactly(small_archive, tmp_path):
    cfg = config(ema_decay=0.95, scheduler={"kind": "onecycle"}, max_epochs=4, oversample=2.5)
    uninterrupted = fit(cfg, small_archive, cache_dir=tmp_path / "cache").history
    # The validated average moves every epoch (a frozen one would score the same each time).
    assert len({m["val_loss"] for m in uninterrupted}) == len(uninterrupted)
    resumed = resumed_after(cfg, small_archive, tmp_path, epoch=2)
    assert [m["epoch"] for m in resumed] == [3, 4]
    assert without_timing(resumed) == without_timing(uninterrupted[2:])


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
def test_a_longer_budget_goes_on_along_its_own_curve_from_the_step_reached(kind):
    """A run extended from 10 steps to 20 uses, from step 10 on, the lrs of a run planned with
    20 from the start, and can step to the new end (onecycle refuses to step past its own)."""
    schedule = config(scheduler={"kind": kind}).scheduler
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight], lr=LR)
    short = build_scheduler(schedule, optimizer, 10)
    for _ in range(10):
        optimizer.step()
        short.step()
    saved = optimizer.state_dict(), short.state_dict()
    optimizer = torch.optim.AdamW([weight], lr=LR)  # as `fit` resumes: built afresh, then loaded
    longer = build_scheduler(schedule, optimizer, 20)
    optimizer.load_state_dict(saved[0])
    continue_on_curve(longer, saved[1])
    used = []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        longer.step()
    used.append(optimizer.param_groups[0]["lr"])
    assert used == pytest.approx(lrs_over({"kind": kind}, 20)[10:], rel=1e-9)


def test_random_flip_flips_about_half_of_each_batch_consistently():
    from marsseg.train.batches import random_flips

    torch.manual_seed(0)
    images = torch.arange(64 * 4 * 8, dtype=torch.float32).reshape(64, 1, 4, 8)
    masks = (images[:, 0] % 5).long()
    dist = images.repeat(1, 4, 1, 1)
    out_images, out_masks, out_dist = random_flips(images, masks, dist)
    flipped = [not torch.equal(a, b) for a, b in zip(out_images, images, strict=True)]
    assert 16 < sum(flipped) < 48
    for i, was_flipped in enumerate(flipped):
        expected = images[i].flip(-1) if was_flipped else images[i]
        assert torch.equal(out_images[i], expected)
        assert torch.equal(out_masks[i], (expected[0] % 5).long())
        assert torch.equal(out_dist[i], expected.repeat(4, 1, 1))


def test_plain_preset_spells_the_plain_recipe():
    plain = preset("plain")
    assert plain.model.name == "unet" and plain.model.knobs["depth"] == 4
    assert plain.model.knobs["base_channels"] == 16 and plain.model.knobs["batch_norm"]
    assert plain.loss.ce_weight == 1.0 and plain.loss.class_weights == "none"
    assert plain.augment.preset == "none" and plain.augment.random_flip
    assert plain.augment.intensity == 0 and plain.oversample == 1.0
    assert (plain.optim.lr, plain.optim.weight_decay) == (3e-3, 1e-4)
    assert plain.scheduler.kind == "onecycle" and plain.batch_size == 32
    assert plain.max_epochs == 20 and plain.early_stopping.patience >= plain.max_epochs
    assert plain.ema_decay == 0
