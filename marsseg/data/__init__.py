"""Loading, validating, cleaning, splitting and describing the challenge's data."""

from __future__ import annotations

import os

from marsseg.data.archive import MarsArchive, archive_from_arrays, load_archive, save_archive
from marsseg.data.outliers import OutlierReport, find_outliers, remove_outliers
from marsseg.data.split import contains_class, kfold_plans, train_val_split
from marsseg.data.stats import class_statistics, format_statistics
from marsseg.data.synthetic import ensure_default_archive, generate, make_archive
from marsseg.errors import DataError

__all__ = [
    "MarsArchive",
    "OutlierReport",
    "archive_from_arrays",
    "class_statistics",
    "clean_archive",
    "contains_class",
    "ensure_default_archive",
    "find_outliers",
    "format_statistics",
    "generate",
    "kfold_plans",
    "load_archive",
    "load_clean_archive",
    "make_archive",
    "remove_outliers",
    "save_archive",
    "train_val_split",
]


def load_clean_archive(path: str | os.PathLike | None = None) -> tuple[MarsArchive, OutlierReport]:
    """Load and validate an archive (default: the synthetic one) and drop its outlier group."""
    return clean_archive(load_archive(path if path is not None else ensure_default_archive()))


def clean_archive(archive: MarsArchive) -> tuple[MarsArchive, OutlierReport]:
    """`archive` without its outlier group; a `DataError` when nothing would be left."""
    keep, report = remove_outliers(archive.masks)
    if len(keep) == 0:
        raise DataError(
            f"{archive.source}: all {len(archive)} training images were removed as outliers "
            f"(identical masks in group(s) of {list(report.group_sizes)}): nothing is left to "
            "train on"
        )
    return archive.subset(keep), report
