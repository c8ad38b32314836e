"""The challenge metric, computed exactly as the course scored it.

The course used Keras `MeanIoU(num_classes=5, ignore_class=0)`:

- pixels whose TRUE label is 0 (background) are dropped;
- one 5x5 confusion matrix is accumulated over the whole set (not a mean of per-batch scores);
- IoU per class is TP / (TP + FP + FN);
- the mean is taken over the classes whose union (TP + FP + FN) is non-zero.

The last two points have a consequence worth knowing: predicting 0 on a non-background pixel
adds a class-0 column entry, so class 0 enters the mean with IoU 0 and drags it down. Decoding
with `metric_aware=True` (argmax over classes 1-4 only) removes that term.

Accumulation stays in torch on the predictions' device, so validation on a GPU never copies
full logits to the CPU: only the 5x5 matrix is ever read back.

Labels come from one rule, `decode`: validation applies it to logits, and every probability
(the submission's, the out-of-fold scores, the calibration's scores) reaches it through
`decode_probabilities`, so the score a run reports is the score of what it submits. Offsets
(`marsseg.calibrate`) are added to log-probabilities; none, or all zero, decode the
probabilities themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from marsseg.classes import BACKGROUND, NUM_CLASSES, SCORED_CLASSES


def decode(
    logits: torch.Tensor,
    metric_aware: bool = True,
    offsets: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn logits (B, 5, H, W) into labels (B, H, W).

    With `metric_aware`, the argmax runs over classes 1-4 only: the metric never rewards a
    class-0 prediction (true-0 pixels are dropped) and penalises it on every other pixel. This is
    not a theorem for every input (a class-0 guess replaced by a wrong class adds a false
    positive to that class), but on a model's informative predictions dropping the class-0 term
    outweighs it; the tests check this over noisy logits.

    `offsets` (5,) are added per class before the argmax (see `marsseg.calibrate`). Logits and
    log-probabilities differ by a per-pixel constant, so either may be passed with them, but
    never probabilities: `decode_probabilities` decodes those.
    """
    if offsets is not None:
        logits = logits + as_offsets(offsets, logits)
    if not metric_aware:
        return logits.argmax(dim=1)
    return logits[:, BACKGROUND + 1 :].argmax(dim=1) + (BACKGROUND + 1)


DECODE_IMAGES = 256
"""Images of probabilities converted (to float32, on their device) at a time: float16
out-of-fold probabilities of a whole training set never exist in float32 all at once."""


def as_offsets(
    offsets: Sequence[float] | np.ndarray | torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """Per-class offsets shaped (1, 5, 1, 1) to broadcast over `like`'s (B, 5, H, W) scores."""
    values = _offset_values(offsets, like.dtype, like.device)
    return values.reshape(1, NUM_CLASSES, *([1] * (like.ndim - 2)))


def _offset_values(
    offsets: Sequence[float] | np.ndarray | torch.Tensor,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> torch.Tensor:
    values = torch.as_tensor(offsets, dtype=dtype, device=device)
    if values.shape != (NUM_CLASSES,):
        raise ValueError(f"offsets must have shape ({NUM_CLASSES},), got {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("offsets must be finite")
    return values


def decoding_offsets(offsets: Sequence[float] | np.ndarray | None) -> np.ndarray | None:
    """`offsets` as (5,) float64 checked, or None for plain decoding: none given, or all 0."""
    if offsets is None:
        return None
    values = _offset_values(offsets).numpy()
    return values if values.any() else None


def apply_offsets(probs: torch.Tensor, offsets: Sequence[float] | np.ndarray) -> torch.Tensor:
    """Scores log(probs) + offsets (float32), offsets broadcast over classes of (B, 5, H, W).

    Probabilities are floored at the smallest normal float32, so a zero stays finite and its
    offset still orders it: the argmax sees no -inf ties.
    """
    if probs.ndim != 4 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"probs must be (B, {NUM_CLASSES}, H, W), got {tuple(probs.shape)}")
    logp = probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return logp + as_offsets(offsets, logp)


def decode_probabilities(
    probs: np.ndarray | torch.Tensor,
    *,
    metric_aware: bool = True,
    offsets: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Labels (N, H, W) uint8 of probabilities (N, 5, H, W): how every probability becomes a
    label (the submission, out-of-fold scores, calibration).

    NumPy or torch, any float dtype, on any device; `DECODE_IMAGES` images are converted to
    float32 and decoded at a time. With `offsets` (see `decoding_offsets`) the argmax runs over
    log-probabilities plus offsets (`apply_offsets`), else over the probabilities themselves.
    """
    offsets = decoding_offsets(offsets)
    out = np.empty((len(probs), *probs.shape[2:]), dtype=np.uint8)
    for start in range(0, len(probs), DECODE_IMAGES):
        window = probs[start : start + DECODE_IMAGES]
        # float32 copies of a NumPy window: arrays from Ray's object store are read-only
        chunk = (
            torch.from_numpy(window.astype(np.float32))
            if isinstance(window, np.ndarray)
            else window.float()
        )
        scores = chunk if offsets is None else apply_offsets(chunk, offsets)
        out[start : start + len(chunk)] = decode(scores, metric_aware=metric_aware).cpu().numpy()
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Confusion matrix (rows: true class, columns: predicted class) without true-background pixels.

    `pred` and `target` are integer label tensors of the same shape on the same device.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    codes = target.reshape(-1).long() * NUM_CLASSES + pred.reshape(-1).long()
    counts = torch.bincount(codes, minlength=NUM_CLASSES * NUM_CLASSES)
    counts = counts.reshape(NUM_CLASSES, NUM_CLASSES)
    counts[BACKGROUND] = 0  # cheaper than selecting the pixels first: no boolean gather
    return counts


@dataclass(frozen=True)
class Scores:
    """What one evaluation reports; every field is derived from `confusion`."""

    confusion: np.ndarray
    """(5, 5) int64, rows true class, columns predicted class, true-background pixels dropped."""
    iou: np.ndarray
    """(5,) float64 IoU per class, NaN where the class's union is empty."""
    mean_iou: float
    """The challenge score: Keras MeanIoU(ignore_class=0), class-0 term included when present."""
    mean_iou_scored: float
    """Mean IoU over classes 1-4 only (those with a non-empty union): the score without the
    class-0 penalty, equal to `mean_iou` whenever nothing is predicted as class 0."""
    pixel_accuracy: float
    """Share of non-background pixels labelled correctly."""

    def per_class(self) -> dict[int, float]:
        """IoU of each scored class (1-4); NaN where a class is in neither truth nor prediction."""
        return {c: float(self.iou[c]) for c in SCORED_CLASSES}


def scores_from_confusion(confusion: np.ndarray | torch.Tensor) -> Scores:
    """Compute every reported figure from an accumulated confusion matrix."""
    cm = np.asarray(
        confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.int64
    )
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = union > 0
    scored = present.copy()
    scored[BACKGROUND] = False
    total = cm.sum()
    return Scores(
        confusion=cm,
        iou=iou,
        mean_iou=float(iou[present].mean()) if present.any() else float("nan"),
        mean_iou_scored=float(iou[scored].mean()) if scored.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
    )


class ConfusionMeter:
    """Accumulates the confusion matrix over batches on the device the predictions live on."""

    def __init__(self) -> None:
        self.matrix: torch.Tensor | None = None

    def reset(self) -> None:
        self.matrix = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of label predictions (B, H, W) against true labels (B, H, W)."""
        batch = confusion_matrix(pred, target.to(pred.device))
        self.matrix = batch if self.matrix is None else self.matrix + batch

    def compute(self) -> Scores:
        if self.matrix is None:
            return scores_from_confusion(np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64))
        return scores_from_confusion(self.matrix)


def score_masks(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> Scores:
    """Score whole prediction and truth label arrays (N, H, W) in one call."""
    return scores_from_confusion(confusion_matrix(torch.as_tensor(pred), torch.as_tensor(target)))
