"""Training and validation throughput of `marsseg.train.fit` per architecture, at default knobs.

    python benchmarks/train_throughput.py                      # every architecture, CPU or GPU
    python benchmarks/train_throughput.py --models marsseg unet --images 2048 --epochs 2
    python benchmarks/train_throughput.py --intensity 0.5 --workers 4   # with online augmentation

Runs the real training path (index-gather batches, or DataLoader workers with online
augmentation) on a synthetic archive and prints, per architecture: training images/s,
validation images/s and the share of training step time spent waiting for data. The first
epoch includes warm-up (cudnn autotuning, allocator growth); with --epochs >= 2 the figures are
from the last epoch.
"""

from __future__ import annotations

import argparse
import time

import torch

from marsseg.config import TrainConfig
from marsseg.data import archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.losses import CombinedLoss
from marsseg.models import list_models
from marsseg.precision import autocast_dtype_for
from marsseg.train import evaluate, fit, prepare_data, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models())
    parser.add_argument("--images", type=int, default=512, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--intensity", type=float, default=0.0, help="online augmentation")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic = generate(n_train=args.images, n_test=1, seed=0, n_aliens=0)
    archive = archive_from_arrays(synthetic.training_set, synthetic.test_set)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    print(f"device: {name} ({threads} CPU threads), torch {torch.__version__}")
    print(
        f"{args.images} images (val 20%), batch {args.batch_size}, offline preset 'reference', "
        f"online intensity {args.intensity}, {args.workers} workers, {args.epochs} epoch(s)\n"
    )
    print("| architecture | train images/s | val images/s | data wait | epoch s |")
    print("|---|---:|---:|---:|---:|")
    for model_name in args.models:
        config = TrainConfig.from_dict(
            {
                "model": {"name": model_name},
                "augment": {"intensity": args.intensity},
                "batch_size": args.batch_size,
                "max_epochs": args.epochs,
            }
        )
        data = prepare_data(config, archive)
        result = fit(config, data, device=device, workers=args.workers)
        last = result.history[-1]
        model = result.model.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        criterion = CombinedLoss(config.loss).to(device)
        evaluate(model, criterion, data, device, autocast_dtype_for(config, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        val_rate = len(data.val_images) / (time.perf_counter() - start)
        print(
            f"| {model_name} | {last['train_images_per_s']:.0f} | {val_rate:.0f} "
            f"| {100 * last['data_wait_fraction']:.1f}% | {last['epoch_time_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
