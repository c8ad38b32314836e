"""Calibrated decoding: fitting per-class offsets, storing them in model.pt, predicting with them.

The synthetic probabilities are true posteriors: labels are drawn from them, so a known shift of
one class's log-probability is exactly the miscalibration `fit_offsets` has to undo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from marsseg import calibrate
from marsseg.calibrate import DEFAULT_GRID, fit_offsets, format_offsets
from marsseg.classes import BIG_ROCK, NUM_CLASSES
from marsseg.config import TrainConfig
from marsseg.data import load_archive
from marsseg.errors import ConfigError
from marsseg.metrics import apply_offsets, decode, score_masks
from marsseg.predict import (
    load_ensemble,
    load_models,
    predict_logits,
    predict_masks,
    predict_probabilities,
    save_models,
)
from marsseg.submission import read_submission
from search import predict as predict_stage

PRIOR = (0.3, 0.35, 0.2, 0.12, 0.03)  # background, soil, bedrock, sand, big rock (rare)
SHIFT = 1.5


def posteriors(
    n: int, seed: int, sharpness: float = 4.0, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (n, 5, 64, 128) and masks drawn from them; big rock's log-prob lowered by
    `shift` after drawing (then renormalised), as a model that under-predicts it would output."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, 64, 128, generator=gen) * sharpness
    logits += torch.log(torch.tensor(PRIOR)).reshape(1, -1, 1, 1)
    probs = logits.softmax(dim=1)
    flat = probs.permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES)
    masks = torch.multinomial(flat, 1, generator=gen).reshape(n, 64, 128)
    probs[:, BIG_ROCK] *= float(np.exp(-shift))
    return probs / probs.sum(dim=1, keepdim=True), masks


def rescored(probs: torch.Tensor, masks: torch.Tensor, offsets: np.ndarray) -> float:
    """Mean IoU of the real decoding path with `offsets`, independent of the fitting code."""
    return score_masks(decode(apply_offsets(probs, offsets)), masks).mean_iou


def relative_big_rock(offsets: np.ndarray) -> float:
    """Big rock's offset relative to the mean of the other scored classes' offsets."""
    return float(offsets[BIG_ROCK] - offsets[1:BIG_ROCK].mean())


@pytest.fixture(scope="module")
def calibrated():
    return posteriors(36, seed=0)


@pytest.fixture(scope="module")
def shifted():
    return posteriors(36, seed=0, shift=SHIFT)


def test_recovers_a_known_prior_shift(calibrated, shifted):
    fitted = fit_offsets(*shifted)
    reference = fit_offsets(*calibrated)
    assert fitted.offsets.dtype == np.float64 and fitted.offsets.shape == (NUM_CLASSES,)
    assert fitted.offsets[0] == 0 and fitted.offsets[1] == 0  # background unused, soil anchored
    assert abs(relative_big_rock(fitted.offsets) - SHIFT) <= 0.2
    # The shift is undone exactly: the fit lands where the calibrated probabilities' fit does.
    undone = relative_big_rock(fitted.offsets) - relative_big_rock(reference.offsets)
    assert undone == pytest.approx(SHIFT, abs=0.15)
    assert fitted.gain > 0.02
    assert fitted.after.mean_iou == pytest.approx(reference.after.mean_iou, abs=2e-3)
    # `before` and `after` are what the real decoding scores.
    assert fitted.before.mean_iou == rescored(*shifted, np.zeros(NUM_CLASSES))
    after = score_masks(decode(apply_offsets(shifted[0], fitted.offsets)), shifted[1])
    np.testing.assert_array_equal(fitted.after.confusion, after.confusion)
    assert fitted.gain == fitted.after.mean_iou - fitted.before.mean_iou


def test_float16_numpy_input_gives_the_same_fit(shifted):
    probs, masks = shifted
    half = fit_offsets(probs.half().numpy(), masks.numpy().astype(np.uint8))
    np.testing.assert_array_equal(half.offsets, fit_offsets(probs.half(), masks).offsets)
    assert abs(relative_big_rock(half.offsets) - SHIFT) <= 0.2


def test_calibrated_probabilities_keep_offsets_near_zero(calibrated):
    fitted = fit_offsets(*calibrated)
    assert np.abs(fitted.offsets).max() <= 0.15
    assert 0 <= fitted.gain < 2e-3


@pytest.mark.parametrize("seed", range(4))
def test_kept_offsets_never_lower_the_score(seed):
    gen = np.random.default_rng(seed)
    probs, masks = posteriors(6, seed, sharpness=float(gen.uniform(0.5, 4)), shift=gen.normal())
    if seed % 2:  # coarse probabilities: exact ties and zeros, which argmax breaks to the lowest
        probs = (probs * 8).round() + 1e-3 * (probs.sum(dim=1, keepdim=True) == 0)
        probs = probs / probs.sum(dim=1, keepdim=True)
    fitted = fit_offsets(probs, masks)
    assert fitted.after.mean_iou >= fitted.before.mean_iou
    assert rescored(probs, masks, fitted.offsets) == fitted.after.mean_iou


def test_a_move_the_real_decoding_does_not_confirm_is_not_kept(shifted, monkeypatch):
    """The one-pass grid scorer proposes, the submission's decoding decides: a proposal that
    lowers the score (a scorer made to propose a harmful offset for every class) is dropped."""
    monkeypatch.setattr(calibrate, "_best_on_grid", lambda *args: -3.0)
    fitted = fit_offsets(*shifted)
    np.testing.assert_array_equal(fitted.offsets, np.zeros(NUM_CLASSES))
    assert fitted.after.mean_iou == fitted.before.mean_iou


def test_fit_is_a_coordinate_wise_optimum_on_its_grid(shifted):
    """No single grid move improves the result, checked by brute force with the real decoding."""
    probs, masks = shifted[0][:5], shifted[1][:5]
    grid = np.round(np.arange(-2, 3.01, 0.1), 6)
    fitted = fit_offsets(probs, masks, grid=grid, rounds=20)
    assert set(fitted.offsets) <= set(grid)
    for c in (2, 3, 4):
        for value in grid:
            trial = fitted.offsets.copy()
            trial[c] = value
            assert rescored(probs, masks, trial) <= fitted.after.mean_iou + 1e-6, (c, value)


def test_background_pixels_are_ignored(shifted):
    probs, masks = shifted
    fitted = fit_offsets(probs, masks)
    # At true-background pixels, make the model all but certain of big rock: were those pixels
    # counted, big rock's false positives would pull its offset down.
    poisoned = probs.clone().permute(0, 2, 3, 1)
    poisoned[masks == 0] = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.96])
    again = fit_offsets(poisoned.permute(0, 3, 1, 2), masks)
    np.testing.assert_array_equal(again.offsets, fitted.offsets)
    np.testing.assert_array_equal(again.before.confusion, fitted.before.confusion)
    np.testing.assert_array_equal(again.after.confusion, fitted.after.confusion)


def test_a_perfect_decoding_keeps_every_offset_at_exactly_zero():
    gen = torch.Generator().manual_seed(3)
    masks = torch.randint(0, NUM_CLASSES, (4, 64, 128), generator=gen)
    probs = (torch.nn.functional.one_hot(masks, NUM_CLASSES) * 4.0 + 0.5).permute(0, 3, 1, 2)
    probs = probs / probs.sum(dim=1, keepdim=True)
    fitted = fit_offsets(probs, masks)
    assert fitted.before.mean_iou == 1.0
    np.testing.assert_array_equal(fitted.offsets, np.zeros(NUM_CLASSES))
    assert fitted.gain == 0.0


def test_a_class_whose_offset_cannot_help_keeps_exactly_zero(shifted):
    """Sand never occurs and the model never gives it any probability: no offset on the grid
    changes a label, every value ties, and sand must stay at 0 while big rock moves."""
    probs, masks = shifted[0].clone(), shifted[1].clone()
    masks[masks == 3] = 0
    probs[:, 3] = 0
    probs = probs / probs.sum(dim=1, keepdim=True)
    fitted = fit_offsets(probs, masks)
    assert fitted.offsets[3] == 0.0
    assert fitted.offsets[BIG_ROCK] > 1.0 and fitted.gain > 0.02


def test_decode_with_offsets_matches_the_probability_path():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, NUM_CLASSES, 64, 128, generator=gen) * 3
    offsets = np.array([0.0, 0.0, -0.3, 0.2, 1.1])
    direct = decode(logits, offsets=offsets)
    via_probs = decode(apply_offsets(logits.softmax(dim=1), offsets))
    assert (direct != via_probs).float().mean() < 1e-4  # equal up to float rounding at ties
    assert (direct != decode(logits)).any()  # the offsets do change labels
    np.testing.assert_array_equal(decode(logits, offsets=np.zeros(5)), decode(logits))
    plain = decode(logits, metric_aware=False, offsets=[100.0, 0, 0, 0, 0])
    assert (plain == 0).all()


def test_apply_offsets_is_log_plus_offsets_and_keeps_zeros_finite():
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0]).reshape(1, 5, 1, 1).half()
    scores = apply_offsets(probs, [0, 1, 2, 3, 4])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    expected = torch.tensor([np.log(0.5), np.log(0.25) + 1, np.log(0.25) + 2])
    torch.testing.assert_close(scores[0, :3, 0, 0], expected.float())


def test_format_offsets():
    assert format_offsets(None) == "none"
    assert format_offsets(np.zeros(5)) == "all 0"
    assert format_offsets([0, 0, -0.25, 0, 1.5]) == "bedrock -0.25, big rock +1.50"


@pytest.mark.parametrize(
    ("probs", "masks", "message"),
    [
        (np.full((2, 4, 8, 8), 0.25), np.ones((2, 8, 8), int), r"probs must be \(N, 5, H, W\)"),
        (np.full((2, 5, 8, 8), 0.2), np.ones((2, 8, 9), int), r"masks shape \(2, 8, 9\) != probs'"),
        (np.full((2, 5, 8, 8), 0.2), np.full((2, 8, 8), 5), "mask labels must be in 0-4, found 5"),
        (np.full((2, 5, 8, 8), 0.2), np.full((2, 8, 8), -1), "mask labels must be in 0-4"),
        (np.full((2, 5, 8, 8), 0.2), np.ones((2, 8, 8)), "masks must hold integer labels"),
        (np.full((2, 5, 8, 8), np.nan), np.ones((2, 8, 8), int), "probs hold NaN"),
        (np.full((2, 5, 8, 8), -0.2), np.ones((2, 8, 8), int), "negative values"),
        (np.ones((2, 5, 8, 8), int), np.ones((2, 8, 8), int), "floating point probabilities"),
        (np.full((2, 5, 8, 8), 0.2), np.zeros((2, 8, 8), int), "no non-background pixels"),
    ],
)
def test_bad_input_raises_one_line_errors(probs, masks, message):
    with pytest.raises(ValueError, match=message) as err:
        fit_offsets(probs, masks)
    assert "\n" not in str(err.value)


def test_bad_settings_raise_one_line_errors():
    probs, masks = np.full((1, 5, 4, 4), 0.2), np.ones((1, 4, 4), int)
    with pytest.raises(ValueError, match="grid must be a non-empty 1-D sequence"):
        fit_offsets(probs, masks, grid=[])
    with pytest.raises(ValueError, match="grid must be"):
        fit_offsets(probs, masks, grid=[0.0, np.inf])
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        fit_offsets(probs, masks, rounds=0)
    with pytest.raises(ValueError, match=r"offsets must have shape \(5,\), got \(4,\)"):
        apply_offsets(torch.full((1, 5, 2, 2), 0.2), [0, 0, 0, 1])
    with pytest.raises(ValueError, match="offsets must be finite"):
        decode(torch.zeros(1, 5, 2, 2), offsets=[0, 0, 0, np.nan, 0])
    assert 0.0 in DEFAULT_GRID and min(DEFAULT_GRID) == -2 and max(DEFAULT_GRID) == 3


# --- model files and prediction ----------------------------------------------------------------

CONFIG = TrainConfig.from_dict(
    {"model": {"name": "unet", "knobs": {"depth": 2, "base_channels": 8}}}
)
OFFSETS = np.array([0.0, 0.0, -0.5, 0.25, 2.0])


def members(n: int = 2) -> list[nn.Module]:
    torch.manual_seed(0)
    return [CONFIG.model.build().eval() for _ in range(n)]


def images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).random((n, 64, 128), dtype=np.float32)


def test_offsets_round_trip_through_the_model_file(tmp_path):
    models = members()
    path = save_models(tmp_path / "model.pt", CONFIG, models, offsets=OFFSETS)
    ensemble = load_ensemble(path)
    assert ensemble.config == CONFIG and len(ensemble.models) == 2
    assert ensemble.offsets.dtype == np.float64
    np.testing.assert_array_equal(ensemble.offsets, OFFSETS)
    assert isinstance(torch.load(path, weights_only=True)["offsets"], list)
    config, loaded = load_models(path)  # the old entry point is unchanged
    assert config == CONFIG and len(loaded) == 2
    x = torch.from_numpy(images(2)).unsqueeze(1)
    torch.testing.assert_close(loaded[1](x), models[1](x))


def test_a_file_without_offsets_loads_without_calibration(tmp_path):
    path = save_models(tmp_path / "model.pt", CONFIG, members(1))
    assert "offsets" not in torch.load(path, weights_only=True)
    assert load_ensemble(path).offsets is None
    old = {"config": CONFIG.to_dict(), "models": torch.load(path, weights_only=True)["models"]}
    torch.save(old, tmp_path / "old.pt")
    assert load_ensemble(tmp_path / "old.pt").offsets is None


def test_bad_offsets_in_a_model_file_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="offsets must be 5 finite numbers"):
        save_models(tmp_path / "model.pt", CONFIG, members(1), offsets=[0, 1])
    state = torch.load(save_models(tmp_path / "m.pt", CONFIG, members(1)), weights_only=True)
    torch.save({**state, "offsets": [0.0, 0.0, float("nan"), 0.0, 0.0]}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"bad\.pt: 'offsets' must be 5 finite numbers"):
        load_ensemble(tmp_path / "bad.pt")


def test_predict_masks_decodes_with_offsets_after_averaging():
    models, x = members(), images()
    probs = torch.cat([p for _, p in predict_probabilities(models, x, tta=True)])
    expected = decode(apply_offsets(probs, OFFSETS)).numpy()
    got = predict_masks(models, x, offsets=OFFSETS, batch_size=2)
    np.testing.assert_array_equal(got, expected)
    plain = predict_masks(models, x)
    assert (got != plain).any()  # the offsets matter for these members
    np.testing.assert_array_equal(plain, decode(probs).numpy())
    np.testing.assert_array_equal(predict_masks(models, x, offsets=np.zeros(5)), plain)


def test_one_inference_function_yields_every_member_and_view_per_window():
    models, x = members(), images()
    seen = list(predict_logits(models, x, tta=True, batch_size=2))
    assert [window.start for window, _ in seen] == [0] * 4 + [2] * 4 + [4] * 4
    assert all(logits.dtype == torch.float32 for _, logits in seen)
    assert [tuple(logits.shape) for _, logits in seen[-4:]] == [(1, 5, 64, 128)] * 4
    batch = torch.from_numpy(x[:2]).unsqueeze(1)
    with torch.no_grad():  # the second view of a member: the flipped images, flipped back
        torch.testing.assert_close(seen[1][1], models[0](batch.flip(-1)).flip(-1))
        torch.testing.assert_close(seen[2][1], models[1](batch))
    expected = torch.stack([logits.softmax(dim=1) for _, logits in seen[:4]]).mean(dim=0)
    window, probs = next(predict_probabilities(models, x, tta=True, batch_size=2))
    assert window == slice(0, 2)
    torch.testing.assert_close(probs, expected)
    plain = list(predict_logits(models[0], x))  # validation's call: one model, no flip
    assert len(plain) == 1 and plain[0][0] == slice(0, 256)


def test_search_predict_applies_stored_offsets_unless_told_not_to(tmp_path, tiny_archive, capsys):
    models = members()
    path = save_models(tmp_path / "model.pt", CONFIG, models, offsets=OFFSETS)
    test_images = load_archive(tiny_archive).test_images
    base = ["--model", str(path), "--data", str(tiny_archive), "--device", "cpu"]

    assert predict_stage.main([*base, "--out", str(tmp_path / "cal.csv")]) == 0
    assert "calibration offsets applied (bedrock -0.50, sand +0.25" in capsys.readouterr().out
    calibrated = read_submission(tmp_path / "cal.csv", n_rows=len(test_images))
    np.testing.assert_array_equal(calibrated, predict_masks(models, test_images, offsets=OFFSETS))

    assert predict_stage.main([*base, "--out", str(tmp_path / "raw.csv"), "--no-calibration"]) == 0
    assert "calibration offsets not applied (--no-calibration)" in capsys.readouterr().out
    raw = read_submission(tmp_path / "raw.csv", n_rows=len(test_images))
    np.testing.assert_array_equal(raw, predict_masks(models, test_images))
    assert (raw != calibrated).any()

    plain_path = save_models(tmp_path / "plain.pt", CONFIG, models)
    argv = ["--model", str(plain_path), "--data", str(tiny_archive), "--device", "cpu"]
    assert predict_stage.main([*argv, "--out", str(tmp_path / "p.csv")]) == 0
    assert "no calibration offsets (the model file stores none)" in capsys.readouterr().out
