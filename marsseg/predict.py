"""Prediction: one model or an ensemble, with flip test-time augmentation and metric-aware decoding.

`predict_logits` is the only place a model meets images outside training: validation, the
submission, out-of-fold probabilities and the TensorBoard panels all go through it.
Probabilities are averaged per batch (over models and over the flipped copy) and decoded at once,
so predicting 10k test images never holds more than one batch of probabilities. Model files hold
the config, the weights of every member and optionally the calibration offsets fitted on their
out-of-fold probabilities (`weights_only=True` loads them: no pickled code).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.config import TrainConfig
from marsseg.data import MarsArchive
from marsseg.device import memory_format_for, resolve_device
from marsseg.errors import ConfigError, DataError, first_line
from marsseg.fileio import atomic_path
from marsseg.metrics import decode_probabilities, decoding_offsets
from marsseg.precision import autocast
from marsseg.submission import write_submission

BATCH = 256


@torch.no_grad()
def predict_logits(
    models: nn.Module | Sequence[nn.Module],
    images: np.ndarray | Tensor,
    device: torch.device | str = "cpu",
    *,
    tta: bool = False,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = BATCH,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield (window, float32 logits (b, 5, H, W) on `device`) for `images` (N, H, W) in [0, 1].

    The one inference path: validation, `predict_probabilities` (test predictions, out-of-fold
    probabilities, TensorBoard panels) all run through it. Models are moved to `device` and put
    in eval mode. For each window of `batch_size` images it yields once per model and, with
    `tta`, once more per model for the horizontally flipped images, flipped back: consecutive
    items share a window. A flip is the one augmentation that keeps rover images plausible (the
    sky stays up). The caller's code runs between yields under the same autocast, as
    validation's loss always has.
    """
    members = [models] if isinstance(models, nn.Module) else list(models)
    device = torch.device(device)
    members = [m.to(device).eval() for m in members]
    if not isinstance(images, Tensor):
        images = torch.from_numpy(np.ascontiguousarray(images))
    layout = memory_format_for(device)
    views = [False, True] if tta else [False]
    for start in range(0, len(images), batch_size):
        window = slice(start, start + batch_size)
        batch = images[window].to(device, non_blocking=True).unsqueeze(1)
        batch = batch.contiguous(memory_format=layout)
        for model in members:
            for flip in views:
                with autocast(device, autocast_dtype):
                    logits = model(batch.flip(-1) if flip else batch).float()
                    yield window, logits.flip(-1) if flip else logits


def predict_probabilities(
    models: nn.Module | Sequence[nn.Module],
    images: np.ndarray | Tensor,
    device: torch.device | str = "cpu",
    *,
    tta: bool = True,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = BATCH,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield (window, mean softmax (b, 5, H, W)) over every model and view of `predict_logits`.

    Averaging a window at a time keeps one window of probabilities in memory, whatever N is.
    """
    logits = predict_logits(
        models, images, device, tta=tta, autocast_dtype=autocast_dtype, batch_size=batch_size
    )
    for start, views in itertools.groupby(logits, key=lambda item: item[0].start):
        total = count = 0
        for _, view in views:
            total, count = total + view.softmax(dim=1), count + 1
        yield slice(start, start + batch_size), total / count


def predict_masks(
    models: Sequence[nn.Module],
    images: np.ndarray,
    device: torch.device | str = "cpu",
    *,
    tta: bool = True,
    metric_aware: bool = True,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = BATCH,
    offsets: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Labels (N, H, W) uint8 for images (N, H, W) in [0, 1], in order.

    The averaged probabilities go through `metrics.decode_probabilities` with `offsets` (5,)
    from `calibrate.fit_offsets`: added to their logarithms, or, None or all zeros, none.
    """
    offsets = decoding_offsets(offsets)  # refused before any prediction
    out = np.empty(images.shape, dtype=np.uint8)
    windows = predict_probabilities(
        models, images, device, tta=tta, autocast_dtype=autocast_dtype, batch_size=batch_size
    )
    for window, probs in windows:
        out[window] = decode_probabilities(probs, metric_aware=metric_aware, offsets=offsets)
    return out


def check_target(path: Path, force: bool) -> None:
    """Refuse to replace an existing submission unless asked to: it may be the one that scored."""
    if path.is_dir():  # --force would not help: no file can be written there
        raise DataError(f"{path} is a folder; the submission needs a file path")
    if path.exists() and not force:
        raise DataError(f"{path} exists; pass --force to overwrite it")


def require_test_set(archive: MarsArchive) -> None:
    if archive.test_images is None:
        raise DataError(f"{archive.source} has no 'test_set': there is nothing to predict")
    if len(archive.test_images) == 0:
        raise DataError(
            f"{archive.source} has an empty 'test_set' (0 images): there is nothing to predict"
        )


def predict_submission(
    models: Sequence[nn.Module],
    archive: MarsArchive,
    path: Path,
    *,
    tta: bool = True,
    metric_aware: bool = True,
    device: torch.device | str | None = None,
    offsets: Sequence[float] | np.ndarray | None = None,
    force: bool = False,
) -> Path:
    """Predict the archive's test set in order and write the submission CSV at `path`.

    Refuses an existing `path` without `force` and an archive without a test set, before
    predicting. `offsets` are the calibration offsets of `marsseg.calibrate` (None: plain
    decoding); `device` None means CUDA when there is one.
    """
    check_target(path, force)
    require_test_set(archive)
    start = time.perf_counter()
    preds = predict_masks(
        models,
        archive.test_images,
        resolve_device(device),
        tta=tta,
        metric_aware=metric_aware,
        offsets=offsets,
    )
    elapsed = time.perf_counter() - start
    print(f"predicted {len(preds)} test images in {elapsed:.1f}s ({len(preds) / elapsed:.0f}/s)")
    return write_submission(preds, path)


@dataclass(frozen=True)
class Ensemble:
    """What a model file holds: the config, the members and the calibration offsets."""

    config: TrainConfig
    models: list[nn.Module]
    offsets: np.ndarray | None
    """(5,) float64 offsets for `predict_masks`; None for a file written without them."""


def save_models(
    path: str | os.PathLike,
    config: TrainConfig,
    models: Sequence[nn.Module],
    offsets: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Write the members' weights, the config that builds them and the offsets, atomically."""
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    state = {"config": config.to_dict(), "models": states}
    if offsets is not None:
        state["offsets"] = _check_offsets(offsets, "offsets")
    with atomic_path(path) as temp:
        torch.save(state, temp)
    return Path(path)


def load_ensemble(path: str | os.PathLike) -> Ensemble:
    """Rebuild what `save_models` wrote, models in eval mode on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a file that is not a checkpoint
        raise ConfigError(f"{path} is not a readable model file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not {"config", "models"} <= state.keys():
        raise ConfigError(f"{path} is not a marsseg model file (expected 'config' and 'models')")
    try:
        config = TrainConfig.from_dict(state["config"])
    except ConfigError as err:
        raise ConfigError(f"{path}: its config is broken: {err}") from None
    members = state["models"]
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{path}: 'models' must be a non-empty list of weights")
    models = []
    for k, weights in enumerate(members, start=1):
        model = config.model.build()
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as err:
            first = first_line(err)
            raise ConfigError(
                f"{path}: member {k}'s weights do not fit its config's {config.model.name} "
                f"({first.rstrip(':.')})"
            ) from None
        bad = next((n for n, t in model.state_dict().items() if not t.isfinite().all()), None)
        if bad is not None:
            raise ConfigError(
                f"{path}: member {k}'s weights are not finite (NaN or inf in {bad}): it was "
                "trained into garbage, and would predict garbage"
            )
        models.append(model.eval())
    offsets = state.get("offsets")
    if offsets is not None:
        offsets = np.array(_check_offsets(offsets, f"{path}: 'offsets'"))
    return Ensemble(config=config, models=models, offsets=offsets)


def load_models(path: str | os.PathLike) -> tuple[TrainConfig, list[nn.Module]]:
    """The config and members of a model file, without its calibration (see `load_ensemble`)."""
    ensemble = load_ensemble(path)
    return ensemble.config, ensemble.models


def _check_offsets(offsets: Sequence[float] | np.ndarray, what: str) -> list[float]:
    """Offsets as a plain list of floats: what `weights_only` loading accepts."""
    try:
        values = np.asarray(offsets, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be {NUM_CLASSES} numbers") from None
    if values.shape != (NUM_CLASSES,) or not np.isfinite(values).all():
        raise ConfigError(f"{what} must be {NUM_CLASSES} finite numbers, got shape {values.shape}")
    return [float(v) for v in values]
