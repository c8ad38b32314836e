"""Per-class pixel counts, shares and image counts: the numbers behind the report's Figure 2."""

from __future__ import annotations

import numpy as np
import pandas as pd

from marsseg.classes import CLASS_NAMES, NUM_CLASSES


def class_statistics(masks: np.ndarray) -> pd.DataFrame:
    """One row per class: pixels, share of all pixels, images containing it, share of images."""
    pixels = np.bincount(masks.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    flat = masks.reshape(len(masks), -1)
    images = np.array([(flat == c).any(axis=1).sum() for c in range(NUM_CLASSES)])
    return pd.DataFrame(
        {
            "class": range(NUM_CLASSES),
            "name": CLASS_NAMES,
            "pixels": pixels,
            "pixel_share": pixels / max(pixels.sum(), 1),
            "images": images,
            "image_share": images / max(len(masks), 1),
        }
    ).set_index("class")


def format_statistics(stats: pd.DataFrame) -> str:
    """The statistics as a fixed-width table with percentages."""
    shown = stats.copy()
    shown["pixel_share"] = (100 * shown["pixel_share"]).map("{:.2f}%".format)
    shown["image_share"] = (100 * shown["image_share"]).map("{:.1f}%".format)
    return shown.to_string()
