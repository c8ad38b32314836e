"""Finding the pasted "alien" outliers by their shared mask.

The challenge's training set holds 110 images of a pasted non-Mars picture, and all 110 carry
one byte-identical mask. Real data has identical masks too: whole-frame one-class labels recur
naturally (the AI4Mars-derived archive has a group of 53 identical near-uniform soil masks, the
challenge about 38 small groups). So an outlier group is not "any duplicate". A group of at
least `min_group` identical masks is flagged when either

- its mask is not near-uniform (no class covers `UNIFORM_SHARE` of it): a detailed mask shared
  by that many different photographs cannot be a labeller's coincidence; or
- it stands on a cliff: `cliff_ratio` times larger than the next group down (a near-uniform
  pasted mask still stands far above natural groups, which fall off gradually).

Everything removed is reported (count, group sizes, indices) and logged, never dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from marsseg.classes import NUM_CLASSES

log = logging.getLogger(__name__)

MIN_GROUP = 20
"""Smallest group that can be flagged. Natural near-uniform groups reach ~50 on real data, so
size alone never flags a near-uniform group: it must also clear the cliff ratio."""
CLIFF_RATIO = 3.0
"""How many times larger than the next group down a near-uniform group must be to be flagged."""
UNIFORM_SHARE = 0.9
"""A mask whose most common class covers this share of pixels is near-uniform."""


@dataclass(frozen=True)
class OutlierReport:
    """What outlier removal found; `indices` are positions in the archive it was run on."""

    indices: np.ndarray
    group_sizes: tuple[int, ...] = field(default=())
    """Sizes of the flagged groups of identical masks, largest first."""
    natural_groups: int = 0
    """Groups of identical masks (size >= 2) that were kept as natural duplicates."""
    largest_natural_group: int = 0

    @property
    def count(self) -> int:
        return len(self.indices)

    def summary(self) -> str:
        if not self.count:
            return (
                f"outliers: none found ({self.natural_groups} natural duplicate-mask groups kept, "
                f"largest {self.largest_natural_group})"
            )
        shown = ", ".join(map(str, self.indices[:20])) + (" ..." if self.count > 20 else "")
        return (
            f"outliers: removed {self.count} images in {len(self.group_sizes)} group(s) of "
            f"identical masks (sizes {list(self.group_sizes)}); kept {self.natural_groups} "
            f"natural duplicate groups (largest {self.largest_natural_group}); indices: {shown}"
        )


def duplicate_mask_groups(masks: np.ndarray) -> list[np.ndarray]:
    """Indices of each group of byte-identical masks with two or more members, largest first."""
    flat = np.ascontiguousarray(masks.reshape(len(masks), -1))
    rows = flat.view(np.dtype((np.void, flat.shape[1] * flat.dtype.itemsize))).ravel()
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    groups = [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts >= 2)]
    return sorted(groups, key=len, reverse=True)


def find_outliers(
    masks: np.ndarray, min_group: int = MIN_GROUP, cliff_ratio: float = CLIFF_RATIO
) -> OutlierReport:
    """Flag groups of identical masks that cannot be natural duplicates (see the module doc).

    Cliff rule: sorting group sizes s0 >= s1 >= ..., groups 0..k are flagged for the smallest k
    with s_k >= min_group and s_k >= cliff_ratio * s_(k+1) (past the last group, s is 1).
    """
    groups = duplicate_mask_groups(masks)
    sizes = [len(g) for g in groups] + [1]
    flagged = [len(group) >= min_group and not _near_uniform(masks[group[0]]) for group in groups]
    for k in range(len(groups)):
        if sizes[k] >= min_group and sizes[k] >= cliff_ratio * sizes[k + 1]:
            flagged[: k + 1] = [True] * (k + 1)
            break
    bad = [g for g, flag in zip(groups, flagged, strict=True) if flag]
    kept = [g for g, flag in zip(groups, flagged, strict=True) if not flag]
    return OutlierReport(
        indices=np.sort(np.concatenate(bad)) if bad else np.empty(0, dtype=np.int64),
        group_sizes=tuple(len(g) for g in bad),
        natural_groups=len(kept),
        largest_natural_group=len(kept[0]) if kept else 0,
    )


def _near_uniform(mask: np.ndarray) -> bool:
    counts = np.bincount(mask.ravel(), minlength=NUM_CLASSES)
    return counts.max() >= UNIFORM_SHARE * mask.size


def remove_outliers(masks: np.ndarray, **kwargs: float) -> tuple[np.ndarray, OutlierReport]:
    """Indices of the images to keep, and the report of what was removed (also logged)."""
    report = find_outliers(masks, **kwargs)
    keep = np.setdiff1d(np.arange(len(masks)), report.indices)
    log.info(report.summary())
    return keep, report
