"""Where tensors run and in which layout: one answer for training, validation and prediction.

Kept apart from `marsseg.train` so that `marsseg.predict` can use it without importing the
training loop (which itself predicts through `marsseg.predict`).
"""

from __future__ import annotations

import torch

from marsseg.errors import ConfigError


def available_devices() -> list[str]:
    """The devices this machine can run on, as `--device` spells them."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as given, or CUDA when there is one and the CPU otherwise.

    A device this machine does not have (`cuda` without CUDA, `cuda:7` on a one-GPU machine,
    an unknown name such as `tpu`) is a `ConfigError` naming it and what is available, not a
    failure at the first tensor moved.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ", ".join(available_devices())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"--device {device}: not a device name; available here: {available}"
        ) from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: CUDA is not available on this machine; available: {available}"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); available: {available}"
            )
        return resolved
    if resolved.type == "mps" and "mps" in available_devices():
        return resolved
    raise ConfigError(f"--device {device}: not available on this machine; available: {available}")


def memory_format_for(
    device: torch.device, channels_last: bool | None = None
) -> torch.memory_format:
    """NHWC when asked, or by default on CUDA; the contiguous NCHW layout otherwise."""
    on = device.type == "cuda" if channels_last is None else channels_last
    return torch.channels_last if on else torch.contiguous_format
