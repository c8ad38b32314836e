"""Reading and validating archives in the challenge's `mars_for_students.npz` format.

The archive stores everything as float32 on a 0-255 scale: `training_set` (N, 2, 64, 128) holds
image and mask, `test_set` (M, 64, 128) holds images. Every later stage trusts what this module
returns, so it checks everything a damaged or foreign archive could get wrong and says exactly
what in one line (`DataError`), instead of letting a NaN or a label 7 surface as a CUDA assert
hours into a search.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marsseg.classes import IMAGE_SHAPE, NUM_CLASSES
from marsseg.errors import DataError
from marsseg.fileio import atomic_path

TRAIN_KEY = "training_set"
TEST_KEY = "test_set"
PIXEL_MAX = 255.0


@dataclass(frozen=True)
class MarsArchive:
    """A validated archive: images scaled to [0, 1], masks as integer labels."""

    images: np.ndarray
    """(N, 64, 128) float32 in [0, 1]."""
    masks: np.ndarray
    """(N, 64, 128) uint8 labels 0-4."""
    test_images: np.ndarray | None
    """(M, 64, 128) float32 in [0, 1], or None for a training-only archive."""
    source: str = ""
    """Where the archive came from (a path), for messages and provenance."""

    def __len__(self) -> int:
        return len(self.images)

    def checksum(self) -> str:
        """A short digest of the training images and masks: which data a result came from."""
        digest = hashlib.blake2b(digest_size=8)
        for array in (self.images, self.masks):
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    def subset(self, indices: np.ndarray) -> MarsArchive:
        """The training images at `indices`, with the same test set."""
        return MarsArchive(self.images[indices], self.masks[indices], self.test_images, self.source)


NPY_MAGIC = b"\x93NUMPY"
"""How a .npy file starts (an .npz is a zip of them)."""


def load_archive(path: str | os.PathLike) -> MarsArchive:
    """Read and validate an archive; raise `DataError` naming the first problem found."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an .npz archive")
    if not path.is_file():
        raise DataError(f"archive not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load would read a .npy or a text file as something else
        with open(path, "rb") as handle:
            single = handle.read(len(NPY_MAGIC)) == NPY_MAGIC
        kind = "a single NumPy array (.npy)" if single else "not a NumPy .npz archive"
        raise DataError(
            f"{path} is {kind}: the data is an .npz archive holding '{TRAIN_KEY}' "
            f"(and '{TEST_KEY}'), as np.savez writes it"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a readable NumPy .npz archive ({err})") from None
    return archive_from_arrays(
        arrays.get(TRAIN_KEY), arrays.get(TEST_KEY), source=str(path), keys=sorted(arrays)
    )


def archive_from_arrays(
    training_set: np.ndarray | None,
    test_set: np.ndarray | None = None,
    *,
    source: str = "<arrays>",
    keys: list[str] | None = None,
) -> MarsArchive:
    """Validate raw arrays in the archive layout and convert them to a `MarsArchive`."""
    if training_set is None:
        found = ", ".join(keys) if keys else "none"
        raise DataError(f"{source}: missing key '{TRAIN_KEY}' (found: {found})")
    training_set = _numeric(training_set, f"{source}: '{TRAIN_KEY}'")
    if training_set.ndim != 4 or training_set.shape[1:] != (2, *IMAGE_SHAPE):
        raise DataError(
            f"{source}: '{TRAIN_KEY}' must have shape (N, 2, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}), "
            f"got {training_set.shape}"
        )
    if len(training_set) == 0:
        raise DataError(f"{source}: '{TRAIN_KEY}' is empty (0 images)")
    images = _checked_images(training_set[:, 0], f"{source}: '{TRAIN_KEY}' images")
    masks = _checked_masks(training_set[:, 1], f"{source}: '{TRAIN_KEY}' masks")

    test_images = None
    if test_set is not None:
        test_set = _numeric(test_set, f"{source}: '{TEST_KEY}'")
        if test_set.ndim != 3 or test_set.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{source}: '{TEST_KEY}' must have shape (M, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}), "
                f"got {test_set.shape}"
            )
        # An empty test set is a valid archive to train on; predicting refuses it.
        test_images = (
            _checked_images(test_set, f"{source}: '{TEST_KEY}'")
            if len(test_set)
            else np.zeros((0, *IMAGE_SHAPE), dtype=np.float32)
        )
    return MarsArchive(images, masks, test_images, source)


def _numeric(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{what} must hold numbers, got dtype {array.dtype}")
    return array


def _first_bad(bad: np.ndarray) -> str:
    """'at 12 pixels in 3 images (first: image 41)' for a boolean array over (N, H, W)."""
    per_image = bad.reshape(len(bad), -1).any(axis=1)
    first = int(np.argmax(per_image))
    return f"at {int(bad.sum())} pixels in {int(per_image.sum())} images (first: image {first})"


def _check_finite(values: np.ndarray, what: str) -> None:
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{what} hold non-finite values (NaN or inf) {_first_bad(bad)}")


def _checked_images(raw: np.ndarray, what: str) -> np.ndarray:
    _check_finite(raw, what)
    low, high = float(raw.min()), float(raw.max())
    if low < 0 or high > PIXEL_MAX:
        raise DataError(f"{what} must lie in 0-255, got values from {low:g} to {high:g}")
    if high == 0:
        raise DataError(f"{what} are all black (every pixel is 0): there is nothing to learn from")
    if high <= 1.0:
        raise DataError(
            f"{what} lie in 0-{high:g}: they look already scaled to [0, 1]; the archive format "
            "stores 0-255"
        )
    return (raw / np.float32(PIXEL_MAX)).astype(np.float32)


def _checked_masks(raw: np.ndarray, what: str) -> np.ndarray:
    _check_finite(raw, what)
    fractional = raw != np.round(raw)
    if fractional.any():
        example = float(raw[fractional].flat[0])
        raise DataError(
            f"{what} hold non-integral label {example:g} {_first_bad(fractional)}; "
            f"labels must be integers 0-{NUM_CLASSES - 1}"
        )
    outside = (raw < 0) | (raw > NUM_CLASSES - 1)
    if outside.any():
        example = float(raw[outside].flat[0])
        raise DataError(
            f"{what} hold label {example:g} {_first_bad(outside)}; "
            f"labels must be 0-{NUM_CLASSES - 1}"
        )
    return raw.astype(np.uint8)


def save_archive(
    path: str | os.PathLike, training_set: np.ndarray, test_set: np.ndarray | None = None
) -> Path:
    """Write arrays in the archive layout, atomically (a temp file renamed into place)."""
    arrays = {TRAIN_KEY: training_set}
    if test_set is not None:
        arrays[TEST_KEY] = test_set
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)
