"""Test-set prediction speed, with and without flip TTA, and the submission write time.

    python -m benchmarks.inference                           # 1770 images, MarsSeg, CPU or GPU
    python -m benchmarks.inference --images 10022 --precision fp32

Times `marsseg.predict.predict_masks` (the whole path of `search.predict` and `search.final`:
batches to the device, softmax, the flipped view averaged back in, metric-aware decoding, masks
back to the host) for the default MarsSeg on synthetic test images, then
`marsseg.submission.write_submission` on the predicted masks. Weights are random: speed does not
depend on them. One untimed batch first warms up (cudnn autotuning); each figure is the median
of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.record import markdown_table, write_results
from marsseg.config import PRECISIONS, TrainConfig
from marsseg.data import archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.precision import autocast_dtype_for
from marsseg.predict import BATCH, predict_masks
from marsseg.submission import write_submission
from marsseg.train import resolve_device

COLUMNS = {
    "step": "step",
    "images": "images",
    "seconds": "seconds",
    "images_per_s": "images/s",
}


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls of `run`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(step: str, images: int, seconds: float) -> dict[str, Any]:
    return {"step": step, "images": images, "seconds": seconds, "images_per_s": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1770, help="synthetic test images")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig.from_dict({"precision": args.precision})  # the default MarsSeg
    synthetic = generate(n_train=1, n_test=args.images, seed=0, n_aliens=0)
    images = archive_from_arrays(synthetic.training_set, synthetic.test_set).test_images
    torch.manual_seed(0)
    models = [config.model.build().to(device).eval()]
    dtype = autocast_dtype_for(config, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; "
        f"{config.model.name} at default knobs, batch {args.batch_size}, precision "
        f"{args.precision}, median of {args.repeats}\n"
    )

    def predict(tta: bool, subset: Any = images) -> Any:
        return predict_masks(
            models, subset, device, tta=tta, autocast_dtype=dtype, batch_size=args.batch_size
        )

    predict(tta=True, subset=images[: args.batch_size])  # warm-up, untimed
    rows = [
        row("predict, no TTA", len(images), median_seconds(lambda: predict(False), args.repeats)),
        row("predict, flip TTA", len(images), median_seconds(lambda: predict(True), args.repeats)),
    ]
    masks = predict(tta=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "submission.csv"
        seconds = median_seconds(lambda: write_submission(masks, path), args.repeats)
        megabytes = path.stat().st_size / 1e6
    rows.append(row(f"write_submission ({megabytes:.0f} MB)", len(masks), seconds))
    print(markdown_table(rows, COLUMNS))
    write_results(
        "inference",
        rows,
        device=device,
        model=config.model.name,
        images=args.images,
        batch_size=args.batch_size,
        precision=args.precision,
        repeats=args.repeats,
    )


if __name__ == "__main__":
    main()
