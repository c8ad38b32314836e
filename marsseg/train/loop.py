"""Training one configuration: the same `fit` serves the CLI, a Ray Tune trial and the final stage.

The loop is plain on purpose (nanoGPT-style): per epoch it draws an index plan (big-rock images
oversampled), trains (stepping a per-batch LR schedule and the weight average after every
step), validates on the held-out split (the average, when there is one), steps
ReduceLROnPlateau and early stopping on validation mIoU, and hands the epoch's metrics and a
checkpointable state to `on_epoch`. Ray is never imported here: `search/` turns `on_epoch`
into `tune.report`.

Speed, for trials that are tiny (64x128 images, a few thousand of them): the whole training set
(offline augmentation included) lives on the training device as tensors and a batch is an index
gather, so an accelerator never waits on a loader. Online augmentation, when the config asks for
it, runs in DataLoader worker processes with prefetching. On CUDA: bf16 autocast, channels_last
and cudnn autotuning; `torch.compile` behind a config switch.

Reproducibility: every epoch reseeds torch and its index plan from (seed, epoch), so a run
resumed from a checkpoint draws exactly what the uninterrupted run drew; on CPU the metrics of
two runs with one seed are identical.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.device import memory_format_for, resolve_device
from marsseg.errors import TrainingError
from marsseg.losses import CombinedLoss
from marsseg.metrics import ConfusionMeter, Scores, decode
from marsseg.precision import autocast, autocast_dtype_for
from marsseg.predict import predict_logits
from marsseg.sampling import oversample_indices
from marsseg.train import keys
from marsseg.train.batches import Batches, PreparedData, epoch_seed, prepare_data
from marsseg.train.schedule import (
    StepHook,
    build_ema,
    build_scheduler,
    epoch_rng,
    total_steps,
)
from marsseg.train.state import EpochState, ended_for_good


@dataclass
class FitResult:
    """A finished run: its history, best epoch and the model with its best weights loaded
    (the weight average's, when the config keeps one)."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_score: float
    best_epoch: int
    stop_reason: str


OnEpoch = Callable[[dict[str, Any], EpochState], None]


def fit(
    config: TrainConfig,
    data: MarsArchive | PreparedData,
    *,
    on_epoch: OnEpoch | None = None,
    checkpoint: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    channels_last: bool | None = None,
) -> FitResult:
    """Train `config` on `data` (a cleaned archive, or data already prepared for this config).

    `checkpoint` resumes from a file written by `EpochState.save`, or from the newest readable
    one of several (newest first; see `EpochState.load_newest`): a damaged file is skipped with
    a printed line, and when none can be read the run starts fresh, saying so. A checkpoint of
    another `max_epochs` continues to this one (`check_continuable`): more epochs extend a run,
    even a finished one, but not one that early stopping ended. `num_threads`
    caps torch's CPU threads (a Ray trial passes its CPU share); `workers` is the number of
    DataLoader processes for online augmentation. `channels_last` stores the model and training
    batches NHWC (None: on CUDA only, where cudnn's tensor-core kernels want it); a benchmark
    switch.
    """
    device = resolve_device(device)
    if num_threads:
        torch.set_num_threads(num_threads)
    if isinstance(data, MarsArchive):
        data = prepare_data(config, data, cache_dir)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    autocast_dtype = autocast_dtype_for(config, device)
    memory_format = memory_format_for(device, channels_last)

    torch.manual_seed(config.seed)
    model = config.model.build().to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        betas=config.optim.betas,
    )
    steps = total_steps(config, data.has_big_rock) if config.scheduler.per_batch else 0
    scheduler = build_scheduler(config.scheduler, optimizer, steps)
    ema = build_ema(model, config.ema_decay)
    state = EpochState(config, model, optimizer, scheduler, ema=ema)
    if checkpoint is not None:
        single = isinstance(checkpoint, (str, os.PathLike))
        state.load_newest([checkpoint] if single else checkpoint)
    after_step = _step_hook(model, scheduler if config.scheduler.per_batch else None, ema)
    step_model = torch.compile(model) if config.compile and cuda else model
    weights = data.class_weights.to(device) if data.class_weights is not None else None
    criterion = CombinedLoss(config.loss, class_weights=weights).to(device)
    batches = Batches(data, config, device, workers)

    stop_reason = ended_for_good(state.history) or (
        "max_epochs" if state.epoch >= config.max_epochs else ""
    )
    while not stop_reason:
        epoch = state.epoch  # 0-based index of the epoch about to run
        torch.manual_seed(epoch_seed(config.seed, epoch))
        plan = oversample_indices(
            data.has_big_rock, config.oversample, epoch_rng(config.seed, epoch)
        )
        start = time.perf_counter()
        train_loss, images_seen, wait = train_epoch(
            step_model,
            criterion,
            optimizer,
            batches.epoch(plan, epoch),
            epoch,
            autocast_dtype,
            memory_format,
            after_step,
        )
        train_time = time.perf_counter() - start
        metrics: dict[str, Any] = {keys.EPOCH: epoch + 1, keys.TRAIN_LOSS: train_loss}
        if data.val_images is not None:
            scored = step_model if ema is None else ema.module
            val_loss, scores = evaluate(scored, criterion, data, device, autocast_dtype, epoch)
            metrics.update(_val_metrics(val_loss, scores))
            stop_reason = _track_best(state, metrics[keys.VAL_MIOU], config)
            if not config.scheduler.per_batch:
                scheduler.step(metrics[keys.VAL_MIOU])
            metrics[keys.VAL_MIOU_BEST] = state.best_score
        elapsed = time.perf_counter() - start
        state.epoch = epoch + 1
        if state.epoch >= config.max_epochs:
            stop_reason = stop_reason or "max_epochs"
        metrics.update(
            {
                keys.LR: optimizer.param_groups[0]["lr"],
                keys.EPOCH_TIME_S: elapsed,
                keys.IMAGES_PER_S: images_seen / train_time,
                keys.DATA_WAIT: wait / train_time,
                keys.FINISHED: bool(stop_reason),
                keys.STOP_REASON: stop_reason,
            }
        )
        state.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, state)

    final = state.eval_model
    if state.best_weights is not None:
        final.load_state_dict(state.best_weights)
    return FitResult(final, state.history, state.best_score, state.best_epoch, stop_reason)


def _step_hook(
    model: nn.Module,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ema: torch.optim.swa_utils.AveragedModel | None,
) -> StepHook | None:
    """What runs after every optimiser step: a per-batch schedule and the weight average."""
    if scheduler is None and ema is None:
        return None

    def after_step() -> None:
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

    return after_step


def _track_best(state: EpochState, score: float, config: TrainConfig) -> str:
    """Keep the best weights; return 'early_stopping' once patience runs out.

    Any improvement updates the best weights and score, but only an improvement of more than
    `min_delta` resets the patience counter (as in Keras' EarlyStopping).
    """
    if score > state.best_score + config.early_stopping.min_delta:
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    if score > state.best_score:
        state.best_score, state.best_epoch = score, state.epoch + 1
        weights = state.eval_model.state_dict()
        state.best_weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
    return "early_stopping" if state.bad_epochs >= config.early_stopping.patience else ""


def train_epoch(
    model: nn.Module,
    criterion: CombinedLoss,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[Tensor, Tensor, Tensor | None]],
    epoch: int,
    autocast_dtype: torch.dtype | None,
    memory_format: torch.memory_format = torch.contiguous_format,
    after_step: StepHook | None = None,
) -> tuple[float, int, float]:
    """One pass over the plan; returns mean loss, images seen and seconds spent waiting for data.

    `after_step` runs after every optimiser step (per-batch LR schedules, the weight average).
    """
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    seen = steps = 0
    wait = 0.0
    while True:
        fetch = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - fetch
        if batch is None:
            break
        images, masks, dist = batch
        images = images.contiguous(memory_format=memory_format)
        with autocast(total.device, autocast_dtype):
            logits = model(images)
        loss = criterion(logits.float(), masks, dist_maps=dist, epoch=epoch)
        auxiliary = getattr(model, "auxiliary_loss", None)  # deep supervision (e.g. hunet)
        if auxiliary is not None:
            loss = loss + auxiliary(criterion, masks, dist_maps=dist, epoch=epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        check_finite_step(model, optimizer, loss, epoch, steps)
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.detach()
        seen += len(images)
        steps += 1
    return float(total) / max(steps, 1), seen, wait


def check_finite_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, epoch: int, step: int
) -> None:
    """Stop the run (`TrainingError`, one line) when a step's loss or gradients are NaN or
    infinite, before the optimiser applies them: the weights would follow, and a run that goes on
    reports scores of garbage and saves a model of NaNs. One device sync per step."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = _total_norm(grads) if grads else torch.zeros_like(loss)
    values = torch.stack([loss.detach().float(), norm.float().to(loss.device)]).tolist()
    for what, value in zip(("loss", "gradient norm"), values, strict=True):
        if not math.isfinite(value):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"{what} is {value} at epoch {epoch + 1}, step {step + 1}: lower optim.lr "
                f"(now {lr:.3g}) or check the data and the loss weights; no model was kept"
            )


def _total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all `tensors` together (torch >= 2.6 has it as `get_total_norm`)."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: CombinedLoss,
    data: PreparedData,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    epoch: int = 0,
) -> tuple[float, Scores]:
    """Validation loss and scores; the confusion matrix accumulates on the device."""
    meter = ConfusionMeter()
    masks = torch.from_numpy(data.val_masks)
    dist = None if data.val_dist is None else torch.from_numpy(data.val_dist)
    total = 0.0
    images = data.val_images
    for window, logits in predict_logits(model, images, device, autocast_dtype=autocast_dtype):
        target = masks[window].to(device).long()
        batch_dist = None if dist is None else dist[window].to(device).float()
        total += float(criterion(logits, target, dist_maps=batch_dist, epoch=epoch)) * len(target)
        meter.update(decode(logits, metric_aware=True), target)
    return total / len(masks), meter.compute()


def _val_metrics(val_loss: float, scores: Scores) -> dict[str, float]:
    metrics = {keys.VAL_LOSS: val_loss, keys.VAL_MIOU: scores.mean_iou}
    for cls, key in keys.IOU_KEYS.items():
        metrics[key] = 0.0 if math.isnan(scores.iou[cls]) else float(scores.iou[cls])
    metrics[keys.PIXEL_ACCURACY] = scores.pixel_accuracy
    return metrics
