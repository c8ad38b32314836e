"""Where tensors run and in which layout: one answer for training, validation and prediction.

Kept apart from `marsseg.train` so that `marsseg.predict` can use it without importing the
training loop (which itself predicts through `marsseg.predict`).
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as given, or CUDA when there is one and the CPU otherwise."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory_format_for(
    device: torch.device, channels_last: bool | None = None
) -> torch.memory_format:
    """NHWC when asked, or by default on CUDA; the contiguous NCHW layout otherwise."""
    on = device.type == "cuda" if channels_last is None else channels_last
    return torch.channels_last if on else torch.contiguous_format
