"""The training data path: split, offline augmentation, and batches that never starve a device.

Trials are tiny (64x128 images, a few thousand of them), so on a GPU the danger is a device
waiting on a loader. Without online augmentation the whole training set (offline copies
included, ~40 MB) is copied to the device once and a batch is an index gather there. With it,
DataLoader workers gather and augment batches on the CPU while the device trains on earlier
ones (pinned memory, non-blocking copies, prefetching).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from marsseg.augment import (
    AugmentedBatches,
    OnlineAugment,
    cached_offline_augment,
    online_pipeline,
)
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive, train_val_split
from marsseg.data.split import contains_class
from marsseg.losses import class_weights_from_masks, signed_distance_maps
from marsseg.paths import cache_root


@dataclass
class PreparedData:
    """Training and validation arrays, ready for the loop: what every epoch draws from."""

    train_images: np.ndarray
    """(N, H, W) float32, offline augmentation included."""
    train_masks: np.ndarray
    train_dist: np.ndarray | None
    """(N, 4, H, W) float16 distance maps for the boundary loss, or None when it is off."""
    has_big_rock: np.ndarray
    val_images: np.ndarray | None
    val_masks: np.ndarray | None
    val_dist: np.ndarray | None
    class_weights: Tensor | None


def prepare_data(
    config: TrainConfig,
    archive: MarsArchive,
    cache_dir: str | os.PathLike | None = None,
    split: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> PreparedData:
    """Split, augment offline (cached per data/preset/seed and shared by trials on a node),
    and compute what the loss needs once, not per step.

    `split` gives (train, validation) indices explicitly, as k-fold training does; by default
    the config's `val_fraction` and `seed` draw a stratified split (none when it is 0).
    """
    if split is not None:
        train_idx, val_idx = split
    elif config.val_fraction > 0:
        train_idx, val_idx = train_val_split(archive.masks, config.val_fraction, config.seed)
    else:
        train_idx, val_idx = np.arange(len(archive)), None
    needs_dist = config.loss.needs_distance_maps
    offline = cached_offline_augment(
        archive.images[train_idx],
        archive.masks[train_idx],
        config.augment.preset,
        config.seed,
        Path(cache_dir) if cache_dir is not None else cache_root() / "offline",
        distance_maps=needs_dist,
    )
    class_weights = None
    if config.loss.class_weights != "none":
        class_weights = class_weights_from_masks(
            offline.masks, config.loss.class_weights, config.loss.class_weight_cap
        )
    val_images = val_masks = val_dist = None
    if val_idx is not None:
        val_images, val_masks = archive.images[val_idx], archive.masks[val_idx]
        val_dist = signed_distance_maps(val_masks).astype(np.float16) if needs_dist else None
    return PreparedData(
        train_images=offline.images,
        train_masks=offline.masks,
        train_dist=offline.dist_maps,
        has_big_rock=contains_class(offline.masks),
        val_images=val_images,
        val_masks=val_masks,
        val_dist=val_dist,
        class_weights=class_weights,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in one epoch: a resumed run redraws what it would have."""
    return seed * 100_003 + epoch


def random_flips(
    images: Tensor, masks: Tensor, dist: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flip a random half of a batch horizontally, images, masks and distance maps alike.

    Drawn from torch's generator on the batch's device, which `fit` reseeds every epoch.
    """
    flip = torch.rand(len(images), device=images.device) < 0.5

    def apply(x: Tensor) -> Tensor:
        return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)

    return apply(images), apply(masks), None if dist is None else apply(dist)


class Batches:
    """Yields training batches (images (B,1,H,W), masks (B,H,W) long, dist maps or None) on device.

    Without online augmentation the arrays are copied to the device once and each batch is an
    index gather there. With it, DataLoader workers gather and augment batches on the CPU while
    the device trains on the previous ones (pinned memory, non-blocking copies, prefetching).
    """

    def __init__(
        self, data: PreparedData, config: TrainConfig, device: torch.device, workers: int
    ) -> None:
        self.device = device
        self.workers = workers
        self.config = config
        self.data = data
        self.online = online_pipeline(config.augment) is not None
        if not self.online:
            # np.array copies: the offline cache is a read-only memory map shared between trials.
            self.images = torch.from_numpy(np.array(data.train_images)).to(device)
            self.masks = torch.from_numpy(np.array(data.train_masks)).to(device)
            self.dist = None
            if data.train_dist is not None:
                self.dist = torch.from_numpy(np.array(data.train_dist)).to(device)

    def epoch(self, plan: np.ndarray, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """The batches of one epoch's index plan; augmentation is seeded by (seed, epoch)."""
        batch_size = self.config.batch_size
        n_batches = max(1, len(plan) // batch_size)  # drop a ragged tail (BatchNorm)
        chunks = np.array_split(plan[: n_batches * batch_size], n_batches)
        if not self.online:
            flip = self.config.augment.random_flip
            for chunk in chunks:
                index = torch.from_numpy(chunk).to(self.device)
                dist = None if self.dist is None else self.dist[index].float()
                batch = (self.images[index].unsqueeze(1), self.masks[index].long(), dist)
                yield random_flips(*batch) if flip else batch
            return
        loader = torch.utils.data.DataLoader(
            AugmentedBatches(
                self.data.train_images,
                self.data.train_masks,
                OnlineAugment(self.config.augment, seed=epoch_seed(self.config.seed, epoch)),
                self.data.train_dist,
            ),
            sampler=chunks,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
        )
        for images, masks, dist in loader:
            yield (
                torch.as_tensor(images).to(self.device, non_blocking=True).unsqueeze(1),
                torch.as_tensor(masks).to(self.device, non_blocking=True).long(),
                None if dist is None else torch.as_tensor(dist).to(self.device).float(),
            )
