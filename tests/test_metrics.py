"""The challenge metric against a plain NumPy transcription of Keras MeanIoU(ignore_class=0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marsseg.metrics import ConfusionMeter, decode, score_masks


def keras_mean_iou(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = 5) -> float:
    """What keras.metrics.MeanIoU(num_classes, ignore_class=0) computes, written out plainly."""
    valid = y_true != 0
    cm = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(cm, (y_true[valid], y_pred[valid]), 1)
    true_positives = np.diag(cm)
    denominator = cm.sum(axis=0) + cm.sum(axis=1) - true_positives
    num_valid_entries = np.count_nonzero(denominator)
    iou = np.divide(true_positives, denominator, out=np.zeros(num_classes), where=denominator != 0)
    return float(iou.sum() / num_valid_entries)


@pytest.mark.parametrize("seed", range(8))
def test_matches_keras_formula_on_random_data(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 5, size=(6, 64, 128))
    # Mostly right, sometimes wrong, sometimes class 0: exercises the class-0 term.
    pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 5, size=truth.shape))
    scores = score_masks(pred, truth)
    assert scores.mean_iou == pytest.approx(keras_mean_iou(truth, pred), abs=1e-12)
    assert scores.confusion[0].sum() == 0  # true-background pixels are dropped
    assert scores.confusion[:, 0].sum() > 0  # ... but predicted class 0 is counted
    assert scores.iou[0] == 0
    # mean over 1-4 leaves the class-0 term out, so it is higher here
    assert scores.mean_iou_scored == pytest.approx(np.nanmean(scores.iou[1:]))
    assert scores.mean_iou_scored > scores.mean_iou


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, size=(3, 64, 128))
    pred = np.where(truth == 0, rng.integers(0, 5, size=truth.shape), truth)  # bg pixels: anything
    scores = score_masks(pred, truth)
    assert scores.mean_iou == 1.0 and scores.mean_iou_scored == 1.0 and scores.pixel_accuracy == 1.0


def test_absent_class_is_left_out_of_the_mean():
    truth = np.ones((1, 64, 128), dtype=np.int64)
    truth[0, :, :64] = 2
    pred = truth.copy()
    pred[0, 0, :8] = 3  # class 3 only ever predicted: enters with IoU 0; class 4 absent
    scores = score_masks(pred, truth)
    assert np.isnan(scores.iou[4]) and scores.iou[3] == 0
    assert scores.mean_iou == pytest.approx(keras_mean_iou(truth, pred))


def test_batched_accumulation_equals_whole_set():
    rng = np.random.default_rng(1)
    truth = torch.from_numpy(rng.integers(0, 5, size=(10, 64, 128)))
    pred = torch.from_numpy(rng.integers(0, 5, size=(10, 64, 128)))
    meter = ConfusionMeter()
    for start in range(0, 10, 3):
        meter.update(pred[start : start + 3], truth[start : start + 3])
    batched, whole = meter.compute(), score_masks(pred, truth)
    np.testing.assert_array_equal(batched.confusion, whole.confusion)
    assert batched.mean_iou == whole.mean_iou
    # A mean of per-batch scores is NOT the metric; make sure the two differ here.
    per_batch = np.mean(
        [score_masks(pred[s : s + 3], truth[s : s + 3]).mean_iou for s in (0, 3, 6, 9)]
    )
    assert per_batch != pytest.approx(whole.mean_iou, abs=1e-9)


def test_meter_stays_on_the_predictions_device():
    meter = ConfusionMeter()
    meter.update(torch.ones(2, 4, 4, dtype=torch.long), torch.ones(2, 4, 4, dtype=torch.long))
    assert meter.matrix.device == torch.ones(1).device
    assert ConfusionMeter().compute().confusion.sum() == 0


def test_metric_aware_decoding_never_predicts_background():
    logits = torch.randn(2, 5, 64, 128)
    logits[:, 0] += 10  # background would win every plain argmax
    labels = decode(logits, metric_aware=True)
    assert labels.min() >= 1 and labels.max() <= 4
    assert (decode(logits, metric_aware=False) == 0).all()


@pytest.mark.parametrize("seed", range(20))
def test_metric_aware_decoding_never_lowers_the_metric(seed):
    """On logits that are informative but noisy (as a model's are), decoding over 1-4 only
    removes the class-0 penalty and never lowers the score."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 5, (4, 64, 128), generator=gen)
    strength = 0.5 + 2 * torch.rand(1, generator=gen).item()
    logits = strength * torch.nn.functional.one_hot(truth, 5).permute(0, 3, 1, 2).float()
    logits = logits + torch.randn(4, 5, 64, 128, generator=gen)
    logits[:, 0] += torch.rand(1, generator=gen).item() * 2  # models often over-predict bg
    plain = score_masks(decode(logits, metric_aware=False), truth).mean_iou
    aware = score_masks(decode(logits, metric_aware=True), truth).mean_iou
    assert aware >= plain
