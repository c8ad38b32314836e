"""`python -m search.predict`: predict a test set with a saved model and write a submission.

    python -m search.predict --model results/final/model.pt --data mars_for_students.npz \\
        --out submission.csv

Calibration offsets stored in the model file (fitted by `search.final` on out-of-fold
probabilities) are applied unless `--no-calibration` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from marsseg.calibrate import format_offsets
from marsseg.cli import run_cli
from marsseg.data import MarsArchive, load_archive
from marsseg.data.synthetic import ensure_default_archive
from marsseg.errors import DataError
from marsseg.predict import load_ensemble, predict_masks
from marsseg.submission import write_submission
from marsseg.train import resolve_device


def check_target(path: Path, force: bool) -> None:
    """Refuse to replace an existing submission unless asked to: it may be the one that scored."""
    if path.exists() and not force:
        raise DataError(f"{path} exists; pass --force to overwrite it")


def require_test_set(archive: MarsArchive) -> None:
    if archive.test_images is None:
        raise DataError(f"{archive.source} has no 'test_set': there is nothing to predict")


def write_test_predictions(
    models: Sequence[nn.Module],
    archive: MarsArchive,
    path: Path,
    *,
    tta: bool,
    metric_aware: bool,
    device: str | None = None,
    offsets: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Predict the archive's test set in order and write the submission CSV.

    `offsets` are the calibration offsets of `marsseg.calibrate` (None: plain decoding).
    """
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


def add_calibration_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="ignore the calibration offsets stored in the model file",
    )


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-tta", action="store_true", help="no horizontal-flip TTA")
    parser.add_argument(
        "--no-metric-aware", action="store_true", help="let the argmax pick class 0 too"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing submission")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m search.predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, required=True, help="model.pt from search.final")
    parser.add_argument("--data", type=Path, help="archive with a test_set (default: synthetic)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"))
    add_decoding_flags(parser)
    add_calibration_flag(parser)
    args = parser.parse_args(argv)
    check_target(args.out, args.force)
    archive = load_archive(args.data or ensure_default_archive())
    require_test_set(archive)
    ensemble = load_ensemble(args.model)
    offsets = None if args.no_calibration else ensemble.offsets
    if ensemble.offsets is None:
        note = "no calibration offsets (the model file stores none)"
    elif args.no_calibration:
        note = "calibration offsets not applied (--no-calibration)"
    else:
        note = f"calibration offsets applied ({format_offsets(offsets)})"
    path = write_test_predictions(
        ensemble.models,
        archive,
        args.out,
        tta=not args.no_tta,
        metric_aware=not args.no_metric_aware,
        device=args.device,
        offsets=offsets,
    )
    print(f"wrote {path}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
