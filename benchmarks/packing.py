"""Aggregate training throughput of 1, 2, 4, 8 trials sharing one device: how far to pack a GPU.

    python -m benchmarks.packing                                # MarsSeg, 1 2 4 8 trials
    python -m benchmarks.packing --trials 1 2 4 --model unet --images 2048 --epochs 3

Each trial is a Ray task holding 1/n of the GPU (and 1/n of the CPU cores) that runs
`marsseg.train.fit` for a fixed number of epochs, validation included, as a search trial does.
A trial's tiny batches leave a big GPU mostly idle, so several trials on one GPU can train more
images per second together than one alone, until they compete for it. The trials start
training together (a barrier after the workers have started) and each times its own run, so
the aggregate, all trials' training images over max(end) - min(start), leaves out process start.

On a machine without a GPU it still runs, with the trials splitting the CPU cores' threads.
The recommendation is the largest number of trials whose aggregate still rises by 10% or more
over the previous one and whose trials all fit in GPU memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from benchmarks.record import markdown_table, write_results
from benchmarks.train_throughput import synthetic_archive
from marsseg.config import TrainConfig
from marsseg.errors import SearchError
from marsseg.models import list_models
from marsseg.train import PreparedData, fit, prepare_data, resolve_device
from search.packing import check_packing

RISE = 0.10
"""Least relative gain in aggregate throughput that makes one more step of packing worth it."""
COLUMNS = {
    "trials": "trials",
    "share": "share per trial",
    "aggregate_images_per_s": "aggregate images/s",
    "speedup": "vs 1 trial",
    "per_trial_images_per_s": "per trial images/s",
    "peak_memory_gib": "peak memory per trial GiB",
    "fits": "fits",
}


@ray.remote(num_cpus=0)
class Barrier:
    """Holds every trial until all `parties` have started, so they train at the same time."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.all_in.set()
        await self.all_in.wait()


@ray.remote(max_retries=0, max_calls=1)
def train_one(data: PreparedData, config: TrainConfig, threads: int, barrier: Any) -> dict:
    """Train `config` once; report the wall-clock span, images trained and peak memory.

    Each call gets a fresh process (`max_calls=1`), as a trial does: a reused one would carry
    its predecessor's warm caches (cudnn autotuning, allocator) into the next row.
    """
    device = resolve_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ray.get(barrier.wait.remote())
    start = time.time()
    try:
        fit(config, data, device=device, num_threads=threads)
    except torch.OutOfMemoryError:
        return {"oom": True}
    end = time.time()
    # `Batches` drops an epoch's ragged tail; with oversample 1 an epoch plans every image once.
    batch = config.batch_size
    images = config.max_epochs * max(1, len(data.train_images) // batch) * batch
    peak = torch.cuda.max_memory_reserved(device) if cuda else None
    return {"oom": False, "start": start, "end": end, "images": images, "peak_bytes": peak}


def aggregate(reports: Sequence[dict]) -> float:
    """All trials' training images over the span from the first start to the last end."""
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return sum(r["images"] for r in reports) / span


def recommend(rows: Sequence[dict]) -> int | None:
    """The largest trial count whose aggregate rises by >= RISE over the previous count (in
    increasing order) and that fits in memory; None when even one trial does not fit."""
    best = None
    previous = None
    for row in sorted(rows, key=lambda r: r["trials"]):
        if not row["fits"]:
            break
        gain = previous is None or row["aggregate_images_per_s"] >= (1 + RISE) * previous
        if not gain:
            break
        best, previous = row["trials"], row["aggregate_images_per_s"]
    return best


def fits_memory(peak_bytes: int | None, total_bytes: int | None, trials: int) -> bool:
    """Whether `trials` such trials fit as the search's packing check would require."""
    if peak_bytes is None or total_bytes is None:
        return True
    try:
        check_packing(peak_bytes, total_bytes, trials)
    except SearchError:
        return False
    return True


def run_packed(
    n: int, data_ref: Any, config: TrainConfig, gpu: bool, cores: int, total_bytes: int | None
) -> dict[str, Any]:
    """Train `n` trials at once on one device and summarise them as one row."""
    threads = max(1, cores // n)
    barrier = Barrier.remote(n)
    task = train_one.options(num_cpus=cores / n, num_gpus=1 / n if gpu else 0)
    reports = ray.get([task.remote(data_ref, config, threads, barrier) for _ in range(n)])
    ray.kill(barrier)
    share = f"{1 / n:.3g} GPU" if gpu else f"{threads} thread(s)"
    if any(r["oom"] for r in reports):
        return {"trials": n, "share": share, "fits": False, "oom": True}
    peaks = [r["peak_bytes"] for r in reports if r["peak_bytes"] is not None]
    peak = max(peaks) if peaks else None
    rate = aggregate(reports)
    return {
        "trials": n,
        "share": share,
        "aggregate_images_per_s": rate,
        "per_trial_images_per_s": rate / n,
        "peak_memory_gib": peak / 2**30 if peak is not None else None,
        "fits": fits_memory(peak, total_bytes, n),
        "spans": [(r["start"], r["end"]) for r in reports],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model", choices=list_models(), default="marsseg")
    parser.add_argument("--images", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    args = parser.parse_args(argv)
    if min(args.trials) < 1 or args.images < 2 or args.epochs < 1:
        parser.error("--trials, --images and --epochs must be positive (--images >= 2)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    cores = os.cpu_count() or 1
    config = TrainConfig.from_dict(
        {
            "model": {"name": args.model},
            "batch_size": args.batch_size,
            "max_epochs": args.epochs,
            "oversample": 1.0,  # every epoch trains the same number of images
        }
    )
    data = prepare_data(config, synthetic_archive(args.images))  # once, shared by the trials
    total = torch.cuda.get_device_properties(device).total_memory if gpu else None
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({cores} cores)"
    print(
        f"device: {name}; {args.model}, batch {args.batch_size}, {len(data.train_images)} "
        f"training images x {args.epochs} epoch(s) per trial, validation each epoch\n"
    )
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=cores,
            num_gpus=1 if gpu else 0,
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        data_ref = ray.put(data)
        print(markdown_table([], COLUMNS), flush=True)
        rows = []
        for n in sorted(set(args.trials)):
            rows.append(run_packed(n, data_ref, config, gpu, cores, total))
            rows[-1]["speedup"] = _speedup(rows[-1], rows[0])
            print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    finally:
        if started:
            ray.shutdown()
    best = recommend(rows)
    print()
    if best is None:
        print("recommended: none, even one trial ran out of memory")
    elif gpu:
        print(f"recommended --gpus-per-trial {1 / best:.3g} ({best} trial(s) per GPU)")
    else:
        print(
            f"recommended: {best} trial(s) at once on this CPU (--cpus-per-trial {cores / best:g})"
        )
    write_results(
        "packing",
        rows,
        device=device,
        model=args.model,
        images=args.images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        recommended_trials=best,
    )


def _speedup(row: dict, first: dict) -> float | None:
    rate, base = row.get("aggregate_images_per_s"), first.get("aggregate_images_per_s")
    return rate / base if rate and base else None


if __name__ == "__main__":
    main()
