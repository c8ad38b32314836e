"""The data figures: sample images with colour-coded masks, and the class distribution."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on a machine with no screen

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.patches import Patch

from marsseg.classes import CLASS_COLOURS, CLASS_NAMES, NUM_CLASSES

MASK_CMAP = ListedColormap(CLASS_COLOURS)


def class_legend(ax: plt.Axes, **kwargs: object) -> None:
    """A legend naming each class in its mask colour."""
    handles = [
        Patch(color=c, label=f"{i} {n}")
        for i, (c, n) in enumerate(zip(CLASS_COLOURS, CLASS_NAMES, strict=True))
    ]
    ax.legend(handles=handles, **kwargs)


def plot_samples(
    images: np.ndarray,
    masks: np.ndarray,
    path: str | os.PathLike,
    indices: np.ndarray,
    title: str = "",
) -> Path:
    """A grid of image / mask pairs (two columns per sample), with a class legend."""
    n = len(indices)
    per_row = 3
    rows = -(-n // per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(4.2 * per_row, 1.2 * rows + 0.9))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    for k, index in enumerate(indices):
        left = axes[k // per_row, 2 * (k % per_row)]
        right = axes[k // per_row, 2 * (k % per_row) + 1]
        left.imshow(images[index], cmap="gray", vmin=0, vmax=1)
        left.set_title(f"image {index}", fontsize=7)
        right.imshow(
            masks[index], cmap=MASK_CMAP, vmin=0, vmax=NUM_CLASSES - 1, interpolation="nearest"
        )
        right.set_title("mask", fontsize=7)
    class_legend(fig, loc="lower center", ncol=NUM_CLASSES, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


def plot_class_distribution(
    stats: pd.DataFrame, path: str | os.PathLike, log: bool = False
) -> Path:
    """Bar chart of per-class pixel shares (log scale shows the rare classes)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    shares = 100 * stats["pixel_share"].to_numpy()
    bars = ax.bar(stats["name"], shares, color=CLASS_COLOURS, edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, labels=[f"{s:.2f}%" for s in shares], fontsize=8)
    ax.set_ylabel("share of pixels (%)")
    if log:
        ax.set_yscale("log")
    ax.set_title("Class distribution")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Write a figure as a PNG (folders created) and release its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def colour_masks(masks: np.ndarray) -> np.ndarray:
    """Label masks (..., H, W) as RGB uint8 (..., H, W, 3) in the class colours."""
    palette = (np.array([to_rgb(c) for c in CLASS_COLOURS]) * 255).round().astype(np.uint8)
    return palette[masks]


def prediction_panel(images: np.ndarray, masks: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """One RGB uint8 picture (n*H, 3*W, 3): per row the input, the ground truth, the prediction.

    What TensorBoard shows every few epochs, so a person sees what a trial gets wrong.
    """
    grey = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    rows = [
        np.concatenate(
            [np.repeat(image[..., None], 3, axis=-1), *colour_masks(np.stack([m, p]))], 1
        )
        for image, m, p in zip(grey, masks, preds, strict=True)
    ]
    return np.concatenate(rows, axis=0)
