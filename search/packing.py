"""Checking, before any trial starts, that trials packed on one GPU fit in its memory.

Ray shares a GPU among trials by count (`--gpus-per-trial 0.25`: four), not by memory, so the
heaviest trial the search may run is measured on a GPU first and the packing refused when that
many of it would not fit.
"""

from __future__ import annotations

import math

import ray

from marsseg.config import TrainConfig
from marsseg.errors import SearchError
from marsseg.models import list_models
from spaces.common import BATCH_SIZES

PACKING_HEADROOM = 0.9
"""Share of a GPU's free memory that packed trials may plan to fill: the rest absorbs what one
measurement cannot see (allocator fragmentation over a long run, each trial's own CUDA context)."""
PROBE_TIMEOUT_S = 600
"""How long the packing check waits for a GPU to measure on before it gives up and says so."""


def check_packing(per_trial_bytes: int, free_bytes: int, trials_per_gpu: int) -> None:
    """Refuse to pack `trials_per_gpu` trials of `per_trial_bytes` each into `free_bytes`."""
    need = trials_per_gpu * per_trial_bytes
    usable = PACKING_HEADROOM * free_bytes
    if need <= usable:
        return
    fits = math.floor(usable / per_trial_bytes) if per_trial_bytes else trials_per_gpu
    advice = (
        f"use --gpus-per-trial {math.floor(1e6 / fits) / 1e6:g} or more ({fits} per GPU)"
        if fits >= 1
        else "even one trial does not fit: lower the batch size or use a larger GPU"
    )
    raise SearchError(
        f"{trials_per_gpu} trials per GPU need about {_gib(need)} GiB ({_gib(per_trial_bytes)} "
        f"GiB each at their peak), more than {PACKING_HEADROOM:.0%} of the {_gib(free_bytes)} "
        f"GiB free on the GPU: {advice}"
    )


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f}"


def trials_per_gpu(gpus_per_trial: float) -> int:
    """How many trials Ray places on one GPU when each asks for `gpus_per_trial` of it."""
    return math.floor(1 / gpus_per_trial + 1e-9)


def check_gpu_packing(base: TrainConfig, archive_images: int, gpus_per_trial: float) -> None:
    """When trials share a GPU, measure the search's heaviest trial on one and check they fit.

    The worst case is every registered architecture at its default knobs, at the largest batch
    the spaces sample, with the boundary loss's distance maps and the offline preset's copy of
    the whole archive resident on the GPU. Skipped for whole GPUs, or while no GPU node is up
    (an autoscaling cluster starts without one).
    """
    if not 0 < gpus_per_trial < 1:
        return
    if not ray.cluster_resources().get("GPU"):
        print("packing check skipped: no GPU node is up yet to measure on")
        return
    print(f"packing check: measuring the heaviest trial on a GPU ({len(list_models())} models)")
    probe = measure_heaviest.options(num_gpus=gpus_per_trial).remote(
        worst_case_configs(base), 2 * archive_images
    )
    try:
        measured = ray.get(probe, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        print(f"packing check skipped: no GPU free to measure on within {PROBE_TIMEOUT_S} s")
        return
    except ray.exceptions.RayTaskError as err:
        cause = str(err.cause).strip().splitlines() if err.cause else []
        raise SearchError(
            f"packing check: measuring on the GPU failed: {cause[0] if cause else err}"
        ) from None
    if measured is None:
        print("packing check skipped: the GPU node's torch sees no CUDA device")
        return
    per_trial, free, heaviest = measured
    trials = trials_per_gpu(gpus_per_trial)
    print(
        f"packing check: {trials} trials per GPU, heaviest {heaviest} at "
        f"{_gib(per_trial)} GiB each, {_gib(free)} GiB free"
    )
    check_packing(per_trial, free, trials)


def worst_case_configs(base: TrainConfig) -> list[TrainConfig]:
    """`base` with each registered architecture at the largest batch the spaces sample
    (`spaces.common.BATCH_SIZES`), distance maps on and no online loader."""
    data = base.to_dict()
    data["batch_size"] = max(base.batch_size, *BATCH_SIZES)
    data["augment"]["intensity"] = 0.0  # the training set stays on the GPU
    if not base.loss.needs_distance_maps:
        data["loss"]["boundary_ramp"] = 0.01  # any value > 0 puts the distance maps on the GPU
    return [TrainConfig.from_dict({**data, "model": {"name": name}}) for name in list_models()]


@ray.remote(num_cpus=1, max_retries=0)
def measure_heaviest(configs: list[TrainConfig], images: int) -> tuple[int, int, str] | None:
    """On a GPU: (peak bytes of the heaviest config, free bytes, its architecture), or None
    where torch sees no CUDA device (a node that declares GPUs it does not have, as in tests).

    Free memory is read before anything is allocated; what the process keeps outside the
    allocator once its kernels are loaded (cuDNN, cuBLAS) is added to the peak.
    """
    import torch

    from marsseg.train.memory import training_memory

    if not torch.cuda.is_available():
        return None
    free_before, _ = torch.cuda.mem_get_info()
    peaks = {config.model.name: training_memory(config, images) or 0 for config in configs}
    free_after, _ = torch.cuda.mem_get_info()
    heaviest = max(peaks, key=peaks.__getitem__)
    return peaks[heaviest] + max(0, free_before - free_after), free_before, heaviest
