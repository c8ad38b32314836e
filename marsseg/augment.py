"""Augmentation for the search: offline presets computed once, and an online pipeline by intensity.

Two mechanisms, because the reference study and the search need both:

- An offline preset (`none`, `reference`) enlarges the training set once. `reference` is the
  study's recipe: one horizontally flipped copy of every image, a quarter of the copies with one
  mask object dropped. `cached_offline_augment` stores the result on disk keyed by a hash of
  (data, preset, seed), so every trial on a node memory-maps the same files instead of
  recomputing them, and distance maps for the boundary loss are cached with them.
- An online pipeline, built from `AugmentConfig.intensity` in the spirit of RandAugment: each
  sample gets a horizontal flip half of the time and N geometric ops at magnitude M, both derived
  from the one knob, so the search explores "how much augmentation" along a single axis.
  Photometric ops are a separate switch, off by default: the reference found them harmful.

Images are float32 (H, W) in [0, 1] and masks uint8 (H, W) in 0..4. Image and mask always go
through the same albumentations call; masks are warped with nearest-neighbour interpolation, and
every pixel whose content an op invents or erases (borders, dropped regions) becomes background,
which the loss ignores.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from marsseg.classes import BACKGROUND
from marsseg.errors import ConfigError, DataError
from marsseg.losses import signed_distance_maps

# albumentations asks PyPI for a newer version on import (up to 2 s, and a warning, on a node
# without network); trial processes have no business on the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

MAX_OPS = 3
"""Online ops per sample at intensity 1 (RandAugment's N); N = ceil(intensity * MAX_OPS)."""
_RECIPE_VERSION = 1
"""Part of the cache key: bump it when an offline preset changes, so stale caches are not reused."""


def _reference_copy() -> A.Compose:
    """The reference study's copy of each image: flipped, and on a quarter, one object dropped."""
    return A.Compose(
        [
            A.HorizontalFlip(p=1.0),
            A.MaskDropout(max_objects=1, fill=0, fill_mask=BACKGROUND, p=0.25),
        ],
        strict=True,
    )


_OFFLINE_COPIES: dict[str, Callable[[], A.Compose] | None] = {
    "none": None,
    "reference": _reference_copy,
}
"""Offline presets: the pipeline that makes one extra copy of every image, or None for no copy."""
PRESETS = tuple(_OFFLINE_COPIES)


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """How the training data is augmented; the defaults are the reference recipe.

    `intensity` scales the online pipeline, 0 being none at all. `photometric` adds brightness,
    contrast, gamma and noise ops at the same intensity (so it has no effect at intensity 0).
    `random_flip` flips each drawn training image (and its mask) horizontally with probability
    1/2, on the device, with no loader: the plain recipe's only augmentation. The online
    pipeline already flips, so it only matters at intensity 0.
    """

    preset: str = "reference"
    intensity: float = 0.0
    photometric: bool = False
    random_flip: bool = False

    def __post_init__(self) -> None:
        _check_preset(self.preset)
        if (
            isinstance(self.intensity, bool)
            or not isinstance(self.intensity, (int, float))
            or not 0 <= self.intensity <= 1
        ):
            raise ConfigError(f"augment.intensity must be in [0, 1], got {self.intensity!r}")
        for name in ("photometric", "random_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"augment.{name} must be true or false, got {getattr(self, name)!r}"
                )


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ConfigError(f"augment.preset must be one of {', '.join(PRESETS)}, got {preset!r}")


def seed_pipeline(pipeline: A.Compose, entropy: int | Sequence[int] | None) -> None:
    """Give all transforms of `pipeline` one shared random stream derived from `entropy`.

    Not `A.Compose(seed=...)`: albumentations 2.0 seeds each transform with that same value, so
    their draws move in lockstep (two p=0.5 ops always fire together).
    """
    numpy_seed, python_seed = np.random.SeedSequence(entropy).spawn(2)
    pipeline.set_random_state(
        np.random.default_rng(numpy_seed), random.Random(int(python_seed.generate_state(1)[0]))
    )


def _check_arrays(images: np.ndarray, masks: np.ndarray) -> None:
    if images.ndim != 3 or images.shape != masks.shape:
        raise DataError(
            f"expected images and masks of one shape (N, H, W), got {images.shape}, {masks.shape}"
        )
    if images.dtype != np.float32 or masks.dtype != np.uint8:
        raise DataError(
            f"expected float32 images and uint8 masks, got {images.dtype} and {masks.dtype}"
        )


def _apply(
    pipeline: A.Compose, images: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Run `pipeline` on each (image, mask) pair, writing into new arrays."""
    out_images, out_masks = np.empty_like(images), np.empty_like(masks)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        result = pipeline(image=image, mask=mask)
        out_images[i], out_masks[i] = result["image"], result["mask"]
    return out_images, out_masks


def offline_augment(
    images: np.ndarray, masks: np.ndarray, preset: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training set enlarged by an offline preset: originals first, then the copies.

    Deterministic for a given seed. `none` returns copies of the inputs unchanged.
    """
    _check_preset(preset)
    _check_arrays(images, masks)
    make_copy = _OFFLINE_COPIES[preset]
    if make_copy is None:
        return images.copy(), masks.copy()
    pipeline = make_copy()
    seed_pipeline(pipeline, seed)
    copy_images, copy_masks = _apply(pipeline, images, masks)
    return np.concatenate([images, copy_images]), np.concatenate([masks, copy_masks])


class OfflineSet(NamedTuple):
    """An offline-augmented training set, read-only and memory-mapped from the node's cache."""

    images: np.ndarray
    masks: np.ndarray
    dist_maps: np.ndarray | None
    """(N, 4, H, W) float16 `signed_distance_maps` of `masks` (float16 halves the largest array;
    the maps lie in [-1, 1], where float16 is exact to ~1e-4), or None if not asked for."""


def cached_offline_augment(
    images: np.ndarray,
    masks: np.ndarray,
    preset: str,
    seed: int,
    cache_dir: str | os.PathLike[str],
    *,
    distance_maps: bool = False,
) -> OfflineSet:
    """`offline_augment`, computed once per (data, preset, seed) under `cache_dir` and reused.

    Trials on one node pass the same `cache_dir`: the first builds (others wait on a file lock
    rather than duplicating the work), the rest memory-map the files, sharing the page cache.
    Entries are written to a staging directory and renamed into place, so a crash never leaves
    a half-written entry. `distance_maps=True` also caches the boundary loss's distance maps.
    """
    _check_preset(preset)
    _check_arrays(images, masks)
    digest = hashlib.blake2b(digest_size=12)
    for array in (images, masks):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    digest.update(f"{preset}|{seed}|{_RECIPE_VERSION}|{A.__version__}".encode())
    entry = Path(cache_dir) / f"offline-{preset}-seed{seed}-{digest.hexdigest()}"

    def build_set() -> dict[str, np.ndarray]:
        augmented_images, augmented_masks = offline_augment(images, masks, preset, seed)
        return {"images": augmented_images, "masks": augmented_masks}

    arrays = _load_or_build(entry, build_set)
    dist_maps = None
    if distance_maps:
        dist_maps = _load_or_build(
            entry.with_name(f"{entry.name}-sdm"),
            lambda: {"dist_maps": signed_distance_maps(arrays["masks"]).astype(np.float16)},
        )["dist_maps"]
    return OfflineSet(arrays["images"], arrays["masks"], dist_maps)


def _load_or_build(
    entry: Path, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Memory-map the arrays of cache directory `entry`, building it first if it is missing."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(f"{entry.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not entry.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
            try:
                for name, array in build().items():
                    np.save(staging / f"{name}.npy", array)
                staging.rename(entry)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return {path.stem: np.load(path, mmap_mode="r") for path in sorted(entry.glob("*.npy"))}


def _border() -> dict[str, object]:
    """Pixels a warp brings in from outside the image: black image, background (ignored) label."""
    return {"border_mode": cv2.BORDER_CONSTANT, "fill": 0.0, "fill_mask": BACKGROUND}


def _geometric_ops(magnitude: float) -> list[A.BasicTransform]:
    """The online geometric ops at magnitude M in (0, 1]. No vertical flip: a rover's view has
    the ground below and the horizon above, and the model may rely on that."""
    m = magnitude
    return [
        A.Affine(
            translate_percent=(-0.1 * m, 0.1 * m),
            scale=(1 - 0.15 * m, 1 + 0.15 * m),
            rotate=(-15 * m, 15 * m),
            p=1.0,
            **_border(),
        ),
        # On 64x128 images, sigma 6 and alpha 80 displace pixels by ~0.9 px on average, ~4 at most.
        A.ElasticTransform(alpha=80 * m, sigma=6, p=1.0, **_border()),
        A.GridDistortion(num_steps=5, distort_limit=0.3 * m, p=1.0, **_border()),
        A.MaskDropout(max_objects=1, fill=0.0, fill_mask=BACKGROUND, p=1.0),
        A.CoarseDropout(
            num_holes_range=(1, 1 + round(3 * m)),
            hole_height_range=(0.1 * m, 0.25 * m),
            hole_width_range=(0.05 * m, 0.15 * m),
            fill=0.0,
            fill_mask=BACKGROUND,
            p=1.0,
        ),
    ]


def _photometric_ops(magnitude: float) -> list[A.BasicTransform]:
    """Image-only ops at magnitude M; albumentations clips float images back to [0, 1]."""
    m = magnitude
    return [
        A.RandomBrightnessContrast(brightness_limit=0.2 * m, contrast_limit=0.2 * m, p=1.0),
        A.RandomGamma(gamma_limit=(100 - 30 * m, 100 + 30 * m), p=1.0),
        A.GaussNoise(std_range=(0.0, 0.05 * m), p=1.0),
    ]


def online_pipeline(config: AugmentConfig) -> A.Compose | None:
    """The online pipeline for `config`, or None at intensity 0 (the identity).

    A flip half of the time, then N = ceil(intensity * MAX_OPS) ops drawn from the geometric
    list at magnitude M = intensity (and, with `photometric`, N more from the photometric list,
    applied first so that they never touch filled borders or holes).
    """
    n_ops = math.ceil(config.intensity * MAX_OPS)
    if n_ops == 0:
        return None
    stages: list[A.BasicTransform | A.BaseCompose] = []
    if config.photometric:
        stages.append(A.SomeOf(_photometric_ops(config.intensity), n=n_ops))
    stages += [A.HorizontalFlip(p=0.5), A.SomeOf(_geometric_ops(config.intensity), n=n_ops)]
    # strict: an argument this albumentations version does not know fails here, not silently.
    return A.Compose(stages, mask_interpolation=cv2.INTER_NEAREST, strict=True)


class OnlineAugment:
    """Per-sample online augmentation from an `AugmentConfig`: (image, mask) -> (image, mask).

    Seeded from `seed` in the main process. In each DataLoader worker it reseeds itself from the
    worker's torch seed (and `seed`), since every worker starts from a copy of the same state
    and would otherwise produce the same augmentations as its siblings.
    """

    def __init__(self, config: AugmentConfig, seed: int | None = None) -> None:
        self.config = config
        self.seed = seed
        self._pipeline = online_pipeline(config)
        if self._pipeline is not None:
            seed_pipeline(self._pipeline, seed)
        self._worker_seed: int | None = None

    @property
    def is_identity(self) -> bool:
        return self._pipeline is None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._pipeline is None:
            return image, mask
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            entropy = [worker.seed] if self.seed is None else [worker.seed, self.seed]
            seed_pipeline(self._pipeline, entropy)
        result = self._pipeline(image=image, mask=mask)
        return result["image"], result["mask"]


def augment_batch(
    augment: OnlineAugment,
    images: np.ndarray,
    masks: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    dist_maps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gather one batch by index and augment it: the unit of work of a DataLoader worker.

    Returns images (B, H, W) float32, masks (B, H, W) uint8 and, if `dist_maps` (the maps of the
    un-augmented masks) is given, the batch's distance maps: gathered from `dist_maps` when the
    augmentation is the identity, recomputed from the augmented masks otherwise.
    """
    indices = np.asarray(indices)
    batch_images, batch_masks = images[indices], masks[indices]
    if augment.is_identity:
        return batch_images, batch_masks, None if dist_maps is None else dist_maps[indices]
    for i in range(len(indices)):
        batch_images[i], batch_masks[i] = augment(batch_images[i], batch_masks[i])
    if dist_maps is None:
        return batch_images, batch_masks, None
    return batch_images, batch_masks, signed_distance_maps(batch_masks).astype(dist_maps.dtype)


class AugmentedBatches(torch.utils.data.Dataset):
    """A dataset indexed by index batches, so augmentation runs in DataLoader workers.

    Feed it a batch sampler over one epoch's plan (see `marsseg.sampling.oversample_indices`):
    `DataLoader(AugmentedBatches(...), sampler=BatchSampler(plan, 32, drop_last=True),
    batch_size=None, num_workers=k)` yields (images, masks, dist_maps) tensors per batch. Masks
    stay uint8 to keep host-to-device copies small: call `.long()` on the device.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        augment: OnlineAugment,
        dist_maps: np.ndarray | None = None,
    ) -> None:
        _check_arrays(images, masks)
        self.images, self.masks, self.augment, self.dist_maps = images, masks, augment, dist_maps

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(
        self, indices: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return augment_batch(self.augment, self.images, self.masks, indices, self.dist_maps)
