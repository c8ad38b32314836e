"""How much GPU memory one training run holds at its peak: what packing trials onto a GPU must fit.

Several trials share a GPU when a search runs with `--gpus-per-trial` below 1, and Ray divides the
GPU by count only: nothing stops the trials together from asking for more memory than the GPU
has, and an out-of-memory error hours into a search costs the trials that hit it. Measuring one
run for a few steps before the search starts is cheap and tells.
"""

from __future__ import annotations

import numpy as np
import torch

from marsseg.classes import IMAGE_SHAPE, NUM_CLASSES
from marsseg.config import TrainConfig
from marsseg.device import memory_format_for
from marsseg.losses import CombinedLoss
from marsseg.precision import autocast_dtype_for
from marsseg.predict import BATCH, predict_logits
from marsseg.train.batches import Batches, PreparedData
from marsseg.train.loop import train_epoch


def training_memory(
    config: TrainConfig, images: int, device: str | torch.device = "cuda", steps: int = 2
) -> int | None:
    """Peak bytes the CUDA caching allocator holds while `config` trains, or None off CUDA.

    Runs what `fit` runs, on random data: a training set of `images` images on the device (as
    `Batches` keeps it without online augmentation, distance maps included when the loss needs
    them), `steps` training steps at the config's batch size with the real loss and optimiser,
    and one validation batch. Counted as reserved rather than allocated memory because another
    process cannot use what the allocator caches. `torch.compile` is not applied (it compiles
    for minutes and usually needs less memory than eager mode, so eager is the safe side).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_steps(config, max(images, steps * config.batch_size), device, steps)
    peak = torch.cuda.max_memory_reserved(device) - before
    torch.cuda.empty_cache()
    return peak


def run_steps(config: TrainConfig, images: int, device: torch.device, steps: int) -> None:
    """Train `steps` steps and validate one batch; everything it allocates is freed on return."""
    data = _random_data(config, images)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as `fit` sets it: autotuning takes workspace
    memory_format = memory_format_for(device)
    model = config.model.build().to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    weights = data.class_weights.to(device) if data.class_weights is not None else None
    criterion = CombinedLoss(config.loss, class_weights=weights).to(device)
    autocast_dtype = autocast_dtype_for(config, device)
    batches = Batches(data, config, device, workers=0)
    plan = np.arange(steps * config.batch_size) % images
    train_epoch(
        model, criterion, optimizer, batches.epoch(plan, 0), 0, autocast_dtype, memory_format
    )
    val = data.train_images[: min(images, BATCH)]
    for _ in predict_logits(model, val, device, autocast_dtype=autocast_dtype):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_data(config: TrainConfig, images: int) -> PreparedData:
    """A training set of the right shapes and dtypes; its content does not change the memory."""
    rng = np.random.default_rng(0)
    shape = (images, *IMAGE_SHAPE)
    dist = None
    if config.loss.needs_distance_maps:
        dist = np.zeros((images, NUM_CLASSES - 1, *IMAGE_SHAPE), dtype=np.float16)
    weights = None if config.loss.class_weights == "none" else torch.ones(NUM_CLASSES)
    return PreparedData(
        train_images=rng.random(shape, dtype=np.float32),
        train_masks=rng.integers(0, NUM_CLASSES, shape, dtype=np.uint8),
        train_dist=dist,
        has_big_rock=np.zeros(images, dtype=bool),
        val_images=None,
        val_masks=None,
        val_dist=None,
        class_weights=weights,
    )
