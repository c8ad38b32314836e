"""Training and validation throughput of `marsseg.train.fit` per architecture, at default knobs.

    python -m benchmarks.train_throughput                      # every architecture, CPU or GPU
    python -m benchmarks.train_throughput --models marsseg unet --images 2048 --epochs 2
    python -m benchmarks.train_throughput --intensity 0.5 --workers 4   # online augmentation
    python -m benchmarks.train_throughput --precision fp32 --channels-last off --epochs 3
    python -m benchmarks.train_throughput --compile --epochs 3 --batch-size 64

Runs the real training path (index-gather batches, or DataLoader workers with online
augmentation) on a synthetic archive and prints, per architecture: training and validation
images/s, the share of training step time spent waiting for data, achieved TFLOP/s (training
FLOPs taken as 3x the forward FLOPs that `python -m marsseg.models` counts: one forward, a
backward of twice its cost), model-FLOPs utilisation against a peak, and peak GPU memory. The
first epoch includes warm-up (cudnn autotuning, allocator growth, `--compile`'s compilation);
with --epochs >= 2 the figures are from the last epoch.

The default peak is the GPU's dense bf16 tensor-core peak from NVIDIA's datasheets (no sparsity),
whatever `--precision` says; give `--peak-tflops` to compare with another (TF32 for fp32 runs).
`--channels-last` switches the layout of the training steps only (validation keeps the default).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.record import markdown_table, write_results
from marsseg.config import PRECISIONS, TrainConfig
from marsseg.data import MarsArchive, archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.losses import CombinedLoss
from marsseg.models import list_models
from marsseg.models.__main__ import forward_flops
from marsseg.precision import autocast_dtype_for
from marsseg.train import evaluate, fit, prepare_data, resolve_device

PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 (`NVIDIA H100 80GB HBM3`)
    ("H200", 989.0),
    ("A100", 312.0),
)
"""Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched in order against
`torch.cuda.get_device_name` (so `H100 PCIe` is tried before the SXM `H100`)."""
DEFAULT_BATCH = 32
TRAIN_FLOPS_PER_FORWARD = 3
"""Training FLOPs per forward FLOP: the backward pass costs about twice the forward."""
COLUMNS = {
    "model": "architecture",
    "train_images_per_s": "train images/s",
    "val_images_per_s": "val images/s",
    "data_wait_pct": "data wait %",
    "epoch_time_s": "epoch s",
    "train_gflops_per_image": "train GFLOP/image",
    "tflops": "TFLOP/s",
    "mfu_pct": "MFU %",
    "peak_memory_gib": "peak memory GiB",
}
CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def default_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, or None (a CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def synthetic_archive(images: int) -> MarsArchive:
    """A synthetic training set of `images` images, without the planted non-Mars outliers."""
    synthetic = generate(n_train=images, n_test=1, seed=0, n_aliens=0)
    return archive_from_arrays(synthetic.training_set, synthetic.test_set)


def train_flops_per_image(config: TrainConfig) -> float:
    """Approximate training FLOPs of one image: 3x the forward pass at the config's knobs."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(config.model.build())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models())
    parser.add_argument("--images", type=int, default=512, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--intensity", type=float, default=0.0, help="online augmentation")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument(
        "--channels-last", choices=tuple(CHANNELS_LAST), default="auto", help="auto: on CUDA"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak for MFU (default: the GPU's dense bf16 peak)"
    )
    return parser.parse_args()


def variant_tag(args: argparse.Namespace) -> str:
    """The levers this run moved from the defaults, for its file name ('' when none)."""
    moved = [
        args.precision if args.precision != "auto" else "",
        f"channels-last-{args.channels_last}" if args.channels_last != "auto" else "",
        "compile" if args.compile else "",
        f"batch{args.batch_size}" if args.batch_size != DEFAULT_BATCH else "",
        f"workers{args.workers}" if args.workers else "",
    ]
    return "-".join(part for part in moved if part)


def measure(
    config: TrainConfig, archive: MarsArchive, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """One architecture's row: fit for the epochs asked, then time one validation pass."""
    data = prepare_data(config, archive)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = fit(
        config,
        data,
        device=device,
        workers=args.workers,
        channels_last=CHANNELS_LAST[args.channels_last],
    )
    last = result.history[-1]
    model = result.model.to(device)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    criterion = CombinedLoss(config.loss).to(device)
    evaluate(model, criterion, data, device, autocast_dtype_for(config, device))
    if cuda:
        torch.cuda.synchronize()
    val_rate = len(data.val_images) / (time.perf_counter() - start)
    flops = train_flops_per_image(config)
    tflops = flops * last["train_images_per_s"] / 1e12
    peak = args.peak_tflops or default_peak_tflops(device)
    return {
        "model": config.model.name,
        "train_images_per_s": last["train_images_per_s"],
        "val_images_per_s": val_rate,
        "data_wait_pct": 100 * last["data_wait_fraction"],
        "epoch_time_s": last["epoch_time_s"],
        "train_gflops_per_image": flops / 1e9,
        "tflops": tflops,
        "mfu_pct": 100 * tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    archive = synthetic_archive(args.images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    peak = args.peak_tflops or default_peak_tflops(device)
    print(f"device: {name} ({threads} CPU threads), torch {torch.__version__}")
    print(
        f"{args.images} images (val 20%), batch {args.batch_size}, offline preset 'reference', "
        f"online intensity {args.intensity}, {args.workers} workers, {args.epochs} epoch(s), "
        f"precision {args.precision}, channels_last {args.channels_last}, "
        f"compile {_compile_text(args.compile, device)}; "
        f"MFU against {f'{peak:g} TFLOP/s' if peak else 'n/a (no known peak)'}\n"
    )
    header = markdown_table([], COLUMNS)
    print(header, flush=True)
    rows = []
    for model_name in args.models:
        config = TrainConfig.from_dict(
            {
                "model": {"name": model_name},
                "augment": {"intensity": args.intensity},
                "batch_size": args.batch_size,
                "max_epochs": args.epochs,
                "precision": args.precision,
                "compile": args.compile,
            }
        )
        rows.append(measure(config, archive, device, args))
        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    write_results(
        "train_throughput",
        rows,
        device=device,
        tag=variant_tag(args),
        images=args.images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        intensity=args.intensity,
        workers=args.workers,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        peak_tflops=peak,
    )


def _compile_text(asked: bool, device: torch.device) -> str:
    if not asked:
        return "off"
    return "on" if device.type == "cuda" else "on (ignored: fit compiles on CUDA only)"


if __name__ == "__main__":
    main()
