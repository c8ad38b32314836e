"""Per-epoch progress lines, one format for every command that trains (here or in a Ray task)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marsseg.train.keys import IOU_KEYS


def epoch_line(metrics: dict[str, Any], max_epochs: int, label: str = "") -> str:
    """One progress line: epoch, loss, val mIoU and per-class IoU, lr, time; `label` (`fold 2/5`)
    first, so the lines of runs that train side by side can be told apart."""
    parts = [label] if label else []
    parts += [f"epoch {metrics['epoch']:>3}/{max_epochs}", f"loss {metrics['train_loss']:.4f}"]
    if "val_miou" in metrics:
        per_class = " ".join(
            f"{key.removeprefix('val_iou_')} {metrics[key]:.3f}" for key in IOU_KEYS.values()
        )
        parts += [f"val mIoU {metrics['val_miou']:.4f}", f"[{per_class}]"]
    parts += [f"lr {metrics['lr']:.1e}", f"{metrics['epoch_time_s']:.1f}s"]
    if metrics["stop_reason"]:
        parts.append(f"-> stop: {metrics['stop_reason']}")
    return "  ".join(parts)


def print_epochs(max_epochs: int, label: str = "") -> Callable[[dict[str, Any], Any], None]:
    """An `on_epoch` for `fit` that prints each epoch's line as it ends, flushed so that a
    redirected log shows a long run's progress while it runs."""

    def on_epoch(metrics: dict[str, Any], _state: Any) -> None:
        print(epoch_line(metrics, max_epochs, label), flush=True)

    return on_epoch
