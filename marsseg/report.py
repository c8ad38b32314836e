"""The final stage's report: per-class IoU next to the reference team's, the calibration's effect,
confusion matrix, training curves and sample predictions, as a Markdown file with PNGs beside it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np

from marsseg.classes import CLASS_NAMES, SCORED_CLASSES
from marsseg.config import TrainConfig
from marsseg.data.figures import class_legend, prediction_panel, save_figure
from marsseg.metrics import Scores

if TYPE_CHECKING:
    from marsseg.calibrate import Calibration

REFERENCE_IOU = {1: 0.8701, 2: 0.8064, 3: 0.8755, 4: 0.2032}
"""The reference team's per-class test IoU (MarsSeg, hidden Kaggle test set): mean 0.69."""


def describe_loss(config: TrainConfig) -> str:
    """The loss terms in play, e.g. `ce+dice0.30+lovasz0.50 w=inverse_sqrt<=10`."""
    loss = config.loss
    terms = [f"ce{loss.ce_weight:g}" if loss.ce_weight != 1 else "ce"]
    if loss.dice_weight:
        terms.append(f"dice{loss.dice_weight:.2f}")
    if loss.lovasz_weight:
        terms.append(f"lovasz{loss.lovasz_weight:.2f}")
    if loss.focal_weight:
        terms.append(f"focal{loss.focal_weight:.2f}")
    if loss.boundary_weight or loss.boundary_ramp:
        terms.append(f"boundary(ramp{loss.boundary_ramp:.3f})")
    weights = "" if loss.class_weights == "none" else f" w={loss.class_weights}"
    if weights and loss.class_weight_cap:
        weights += f"<={loss.class_weight_cap:g}"
    return "+".join(terms) + weights


def describe_schedule(config: TrainConfig) -> str:
    """The LR schedule and weight average in play, e.g. `onecycle(0.30) ema0.995`."""
    schedule = config.scheduler
    text = schedule.kind
    if schedule.kind in ("onecycle", "cosine"):
        text += f"({schedule.warmup_fraction:.2f})"
    return text + (f" ema{config.ema_decay:.4g}" if config.ema_decay else "")


def describe_augment(config: TrainConfig) -> str:
    """The augmentation in play, e.g. `reference i=0.30 +photo`."""
    augment = config.augment
    return (
        f"{augment.preset} i={augment.intensity:.2f}"
        + (" +photo" if augment.photometric else "")
        + (" +flip" if augment.random_flip else "")
    )


def plot_confusion(scores: Scores, path: str | os.PathLike) -> Path:
    """Confusion matrix of the scored pixels, each true class's row normalised to 1."""
    cm = scores.confusion[1:, :].astype(float)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), share in np.ndenumerate(rows):
        ax.text(
            j,
            i,
            f"{share:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if share > 0.6 else "black",
        )
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=30)
    ax.set_yticks(range(len(SCORED_CLASSES)), [CLASS_NAMES[c] for c in SCORED_CLASSES])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(histories: Sequence[Sequence[dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Training loss and validation mIoU per epoch, one line per trained model."""
    fig, (loss_ax, miou_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for k, history in enumerate(histories):
        epochs = [m["epoch"] for m in history]
        loss_ax.plot(epochs, [m["train_loss"] for m in history], label=f"model {k + 1}")
        if all("val_miou" in m for m in history):
            miou_ax.plot(epochs, [m["val_miou"] for m in history], label=f"model {k + 1}")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    miou_ax.set(xlabel="epoch", ylabel="val mIoU", title="Validation mIoU")
    for ax in (loss_ax, miou_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_predictions(
    images: np.ndarray, masks: np.ndarray, preds: np.ndarray, path: str | os.PathLike
) -> Path:
    """Input, ground truth and prediction side by side for a few validation images."""
    fig, ax = plt.subplots(figsize=(9, 1.1 * len(images) + 0.8))
    ax.imshow(prediction_panel(images, masks, preds), interpolation="nearest")
    ax.set_xticks([64, 192, 320], ["input", "ground truth", "prediction"])
    ax.set_yticks([])
    class_legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=5, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def iou_table(scores: Scores | None, label: str) -> str:
    """Markdown table of per-class IoU next to the reference team's."""
    lines = [f"| class | {label} | reference team (test) |", "|---|---:|---:|"]
    for cls in SCORED_CLASSES:
        ours = f"{scores.iou[cls]:.4f}" if scores is not None else "-"
        lines.append(f"| {CLASS_NAMES[cls]} | {ours} | {REFERENCE_IOU[cls]:.4f} |")
    mean = f"{scores.mean_iou:.4f}" if scores is not None else "-"
    lines.append(f"| **mean IoU** | **{mean}** | **{np.mean(list(REFERENCE_IOU.values())):.4f}** |")
    return "\n".join(lines)


def calibration_table(calibration: Calibration) -> str:
    """Markdown table of per-class out-of-fold IoU without and with the offsets, and each offset."""
    before, after = calibration.before, calibration.after
    lines = ["| class | IoU before | IoU after | offset |", "|---|---:|---:|---:|"]
    for cls in SCORED_CLASSES:
        lines.append(
            f"| {CLASS_NAMES[cls]} | {before.iou[cls]:.4f} | {after.iou[cls]:.4f} "
            f"| {calibration.offsets[cls]:+.2f} |"
        )
    lines.append(
        f"| **out-of-fold mIoU** | **{before.mean_iou:.4f}** | **{after.mean_iou:.4f}** "
        f"| {calibration.gain:+.4f} |"
    )
    return "\n".join(lines)


def settings(config: TrainConfig) -> dict[str, str]:
    """The config in a few readable rows."""
    knobs = ", ".join(f"{k}={v}" for k, v in config.model.knobs.items())
    optim = config.optim
    return {
        "architecture": f"{config.model.name} ({knobs})",
        "loss": describe_loss(config),
        "augmentation": describe_augment(config),
        "big-rock oversampling": f"{config.oversample:g}x",
        "optimiser": f"AdamW lr {optim.lr:.2e}, weight decay {optim.weight_decay:.1e}",
        "lr schedule": describe_schedule(config),
        "batch size": str(config.batch_size),
    }


def write_report(
    out: Path,
    *,
    config: TrainConfig,
    scores: Scores | None,
    score_label: str,
    histories: Sequence[Sequence[dict[str, Any]]],
    samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    facts: dict[str, Any],
    commands: Sequence[str],
    calibration: Calibration | None = None,
) -> Path:
    """Write `report.md` and its PNGs into `out` (a calibration section when offsets were fit)."""
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        "# Final training report",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in {**settings(config), **facts}.items()),
        "",
        "## Per-class IoU",
        "",
        iou_table(scores, score_label),
        "",
        "The reference team's figures are on the challenge's hidden test set; ours are on held-out"
        " training images, so the two columns are comparable in kind, not in data.",
        "",
    ]
    if calibration is not None:
        sections += [
            "## Calibration",
            "",
            "Per-class offsets added to the log-probabilities before the metric-aware argmax,"
            " fit on the out-of-fold probabilities; the submission is decoded with them.",
            "",
            calibration_table(calibration),
            "",
        ]
    sections += [
        "## Training curves",
        "",
        f"![training curves]({plot_curves(histories, out / 'curves.png').name})",
    ]
    if scores is not None:
        confusion = plot_confusion(scores, out / "confusion.png")
        sections += ["", "## Confusion matrix", "", f"![confusion matrix]({confusion.name})"]
    if samples is not None:
        grid = plot_predictions(*samples, out / "predictions.png")
        sections += ["", "## Sample predictions", "", f"![sample predictions]({grid.name})"]
    sections += ["", "## Commands", "", "```bash", *commands, "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(sections))
    return path
