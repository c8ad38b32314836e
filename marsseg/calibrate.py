"""Calibrated decoding: per-class offsets added to log-probabilities before the argmax.

A model trained on imbalanced data under-predicts the rare class (big rock). Adding a constant
offset per class to the log-probabilities (a prior shift) moves the decision boundaries; even a
perfectly calibrated model gains from it, because the argmax maximises accuracy, not mean IoU. The
offsets are fitted on out-of-fold probabilities of a k-fold ensemble: many images, so a handful
of numbers cannot overfit them the way they would a small validation split.

Decoding is metric-aware (argmax over classes 1-4), so the offsets are identified only up to a
constant shared by classes 1-4: soil (class 1, the commonest) is anchored at 0 and the others are
relative to it. Background's offset is 0 too: it never takes part in the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from marsseg.classes import BACKGROUND, CLASS_NAMES, NUM_CLASSES
from marsseg.metrics import (
    DECODE_IMAGES,
    Scores,
    decode_probabilities,
    score_masks,
    scores_from_confusion,
)

ANCHOR = 1
"""Soil: its offset stays 0 and fixes the constant the argmax over classes 1-4 cannot see."""
DEFAULT_GRID = tuple(np.round(np.linspace(-2.0, 3.0, 101), 6).tolist())
"""Candidate log-offsets, -2 to +3 in steps of 0.05: one pass scores all of them (`fit_offsets`)."""
TOLERANCE = 1e-6
"""A move must raise mean IoU by more than this: ties and float noise leave the offset alone."""


@dataclass(frozen=True)
class Calibration:
    """Offsets fitted on one set of probabilities, with the scores they were judged by."""

    offsets: np.ndarray
    """(5,) float64 added to log-probabilities; 0 for background, soil and every class whose
    offset did not raise the score."""
    before: Scores
    """Metric-aware decoding of the fitting set without offsets."""
    after: Scores
    """The same with the kept offsets."""

    @property
    def gain(self) -> float:
        """Mean IoU the offsets add on the fitting set (>= 0: moves are kept only if they help)."""
        return self.after.mean_iou - self.before.mean_iou


def fit_offsets(
    probs: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    rounds: int = 3,
) -> Calibration:
    """Fit the offsets of bedrock, sand and big rock that maximise the challenge's mean IoU.

    `probs` are (N, 5, H, W) probabilities (NumPy or torch, float16/32), `masks` (N, H, W) labels.
    Only pixels whose true label is not background count for the metric, so only they are kept
    (all of them: no subsampling). Coordinate ascent from 0 over the non-anchor classes, at most
    `rounds` passes, each offset chosen from `grid` (absolute values, 0 always included). All grid
    values of one class are scored in one pass: with the other offsets fixed, a pixel becomes
    that class exactly when the offset exceeds a per-pixel threshold, so one bincount of
    (threshold bin, truth, runner-up) gives every candidate's confusion matrix. The best move is
    then re-scored with the submission's decoding (`metrics.decode_probabilities`), and kept only
    if that raises mean IoU by more than `TOLERANCE`; a class is looked at again only after
    another one moved.
    """
    values = _check_grid(grid)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    logp, target = _scored_pixels(probs, masks)
    offsets = np.zeros(NUM_CLASSES, dtype=np.float64)
    before = current = _score(probs, masks, offsets)
    free = [c for c in range(BACKGROUND + 1, NUM_CLASSES) if c != ANCHOR]
    stale = set(free)  # classes whose best offset may have changed since they were last fitted
    for _ in range(rounds):
        for c in free:
            if c not in stale:
                continue
            stale.discard(c)
            candidate = _best_on_grid(logp, target, offsets, c, values)
            if candidate == offsets[c]:
                continue
            trial = offsets.copy()
            trial[c] = candidate
            scores = _score(probs, masks, trial)
            if scores.mean_iou > current.mean_iou + TOLERANCE:
                offsets, current = trial, scores
                stale.update(k for k in free if k != c)
        if not stale:
            break
    return Calibration(offsets=offsets, before=before, after=current)


def format_offsets(offsets: Sequence[float] | np.ndarray | None) -> str:
    """One line naming each non-zero offset, for logs and reports."""
    if offsets is None:
        return "none"
    parts = [f"{CLASS_NAMES[c]} {v:+.2f}" for c, v in enumerate(np.asarray(offsets)) if v != 0]
    return ", ".join(parts) if parts else "all 0"


def _scored_pixels(
    probs: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (4, P) float32 of classes 1-4 and labels (P,) of non-background pixels.

    Class-major, so every per-class operation below reads one contiguous row.
    """
    probs = torch.as_tensor(probs)
    masks = torch.as_tensor(masks)
    if probs.ndim != 4 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"probs must be (N, {NUM_CLASSES}, H, W), got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point probabilities, got {probs.dtype}")
    expected = (probs.shape[0], *probs.shape[2:])
    if tuple(masks.shape) != expected:
        raise ValueError(f"masks shape {tuple(masks.shape)} != probs' (N, H, W) {expected}")
    if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
        raise ValueError(f"masks must hold integer labels, got {masks.dtype}")
    if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= NUM_CLASSES):
        low, high = int(masks.min()), int(masks.max())
        raise ValueError(f"mask labels must be in 0-{NUM_CLASSES - 1}, found {low}..{high}")
    total = int((masks != BACKGROUND).sum())
    if total == 0:
        raise ValueError("no non-background pixels to fit offsets on")
    logp = torch.empty(NUM_CLASSES - 1, total, dtype=torch.float32)
    target = torch.empty(total, dtype=torch.int64)
    at = 0
    for start in range(0, len(probs), DECODE_IMAGES):
        p = probs[start : start + DECODE_IMAGES]
        if not (torch.isfinite(p).all() and (p >= 0).all()):
            raise ValueError("probs hold NaN, infinite or negative values")
        m = masks[start : start + DECODE_IMAGES].reshape(-1)
        keep = m != BACKGROUND
        n = int(keep.sum())
        target[at : at + n] = m[keep]
        for k in range(BACKGROUND + 1, NUM_CLASSES):
            logp[k - 1, at : at + n] = p[:, k].reshape(-1)[keep]
        at += n
    logp.clamp_min_(torch.finfo(torch.float32).tiny).log_()
    return logp, target


def _check_grid(grid: Sequence[float]) -> np.ndarray:
    values = np.asarray(grid, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError("grid must be a non-empty 1-D sequence of finite offsets")
    return np.unique(np.append(values, 0.0))


def _argmax(
    logp: torch.Tensor, offsets: np.ndarray, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over `classes` of logp + offset per pixel (float32), and the label attaining it (uint8).

    Ties go to the lowest class, as in `torch.argmax` and so in `metrics.decode`. A running
    maximum over rows is several times faster than `argmax` over the (4, P) tensor.
    """
    first, *rest = classes
    best = logp[first - 1] + np.float32(offsets[first])
    label = torch.full(best.shape, first, dtype=torch.uint8)
    for k in rest:
        value = logp[k - 1] + np.float32(offsets[k]) if offsets[k] else logp[k - 1]
        label.masked_fill_(value > best, k)
        torch.maximum(best, value, out=best)
    return best, label


def _score(
    probs: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor, offsets: np.ndarray
) -> Scores:
    """Scores of the submission's decoding with `offsets`, by the challenge's own metric code."""
    return score_masks(decode_probabilities(probs, offsets=offsets), masks)


def _best_on_grid(
    logp: torch.Tensor, target: torch.Tensor, offsets: np.ndarray, c: int, grid: np.ndarray
) -> float:
    """The grid value of class c's offset with the highest mean IoU, the others held fixed.

    Ties go to the value nearest the current one, so a flat score leaves the offset unchanged.
    """
    others = [k for k in range(BACKGROUND + 1, NUM_CLASSES) if k != c]
    best_other, runner = _argmax(logp, offsets, others)
    # The pixel is predicted c for every grid value above its threshold: bin j counts the pixels
    # whose first such grid value is grid[j] (bin len(grid): never c).
    threshold = best_other.sub_(logp[c - 1])
    n, k = len(grid), NUM_CLASSES
    step = (grid[-1] - grid[0]) / (n - 1) if n > 1 else 0.0
    if n > 1 and np.allclose(np.diff(grid), step, rtol=1e-6, atol=0):
        # Uniform grid: the bin by arithmetic, 4x faster than a binary search. Float rounding
        # may move a pixel lying on a grid value by one bin; the re-score is exact anyway.
        first = threshold.sub_(grid[0]).mul_(1 / step).floor_().add_(1).clamp_(0, n).long()
    else:
        first = torch.searchsorted(torch.as_tensor(grid, dtype=logp.dtype), threshold, right=True)
    codes = first.mul_(k).add_(target).mul_(k).add_(runner)
    moves = torch.bincount(codes, minlength=(n + 1) * k * k).reshape(n + 1, k, k).numpy()
    base = moves.sum(axis=0)  # every pixel predicted as its runner-up
    switched = np.cumsum(moves, axis=0)[:n]  # (grid value, truth, runner-up): now predicted c
    confusions = base[None] - switched
    confusions[:, :, c] += switched.sum(axis=2)
    means = np.array([scores_from_confusion(cm).mean_iou for cm in confusions])
    top = np.flatnonzero(means >= means.max() - TOLERANCE)
    return float(grid[top[np.argmin(np.abs(grid[top] - offsets[c]))]])
