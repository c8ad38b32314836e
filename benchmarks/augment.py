"""Augmentation throughput per core: can the CPU side keep a GPU trial fed?

    python benchmarks/augment.py                           # 1024 synthetic images
    python benchmarks/augment.py --images 2505 --intensities 0 0.5 1

Runs on one core (OpenCV and torch single-threaded), on a synthetic archive in the challenge's
format, and prints images/s for:

- each offline preset: one pass over the training set, done once per (data, preset, seed) and
  then read from the node's cache (the cache build and load times are printed too);
- the online pipeline at each intensity, photometric ops off and on, run per sample through
  `augment_batch` as a DataLoader worker runs it (divide a trial's images/s by this to get the
  workers it needs);
- signed distance maps for the boundary loss (masks/s), needed once per augmented mask.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from marsseg.augment import (
    PRESETS,
    AugmentConfig,
    OnlineAugment,
    augment_batch,
    cached_offline_augment,
    offline_augment,
)
from marsseg.data import archive_from_arrays, generate
from marsseg.losses import signed_distance_maps


def _rate(n: int, run: Callable[[], object], repeats: int) -> float:
    """Items per second of `run` over `n` items, best of `repeats` (the machine may be shared)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="synthetic training images")
    parser.add_argument("--intensities", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    synthetic = generate(n_train=args.images, n_test=0, seed=0)
    archive = archive_from_arrays(synthetic.training_set)
    images, masks = archive.images, archive.masks
    n = len(images)
    print(f"{n} synthetic images {images.shape[1:]}, one core, best of {args.repeats}")
    print(f"{'what':<42} {'images/s/core':>14}")

    for preset in PRESETS:
        rate = _rate(n, lambda p=preset: offline_augment(images, masks, p, seed=0), args.repeats)
        print(f"{'offline preset ' + preset:<42} {rate:>14,.0f}")

    everything = np.arange(n)
    for photometric in (False, True):
        for intensity in args.intensities:
            augment = OnlineAugment(
                AugmentConfig(intensity=intensity, photometric=photometric), seed=0
            )
            rate = _rate(
                n, lambda a=augment: augment_batch(a, images, masks, everything), args.repeats
            )
            label = f"online intensity {intensity:.2f}" + (" + photometric" if photometric else "")
            print(f"{label:<42} {rate:>14,.0f}")

    rate = _rate(n, lambda: signed_distance_maps(masks), args.repeats)
    print(f"{'signed distance maps (masks/s)':<42} {rate:>14,.0f}")

    with tempfile.TemporaryDirectory() as cache_dir:
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            cached = cached_offline_augment(
                images, masks, "reference", 0, cache_dir, distance_maps=True
            )
            float(np.abs(cached.dist_maps).max())  # read the whole memory map
            timings.append(time.perf_counter() - start)
    print(
        f"reference preset + distance maps of {2 * n} images: build and cache "
        f"{timings[0]:.2f} s, reuse from cache {timings[1]:.2f} s"
    )


if __name__ == "__main__":
    main()
