"""Mixed precision in one place: which dtype a config asks for on a device, and the context."""

from __future__ import annotations

import contextlib

import torch

from marsseg.config import TrainConfig


def autocast_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 under `precision: bf16`, or `auto` on CUDA; None means plain fp32."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on `device`, or nothing at all when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
