"""`python -m search.predict`: predict a test set with a saved model and write a submission.

    python -m search.predict --model results/final/model.pt --data mars_for_students.npz \\
        --out submission.csv

Calibration offsets stored in the model file (fitted by `search.final` on out-of-fold
probabilities) are applied unless `--no-calibration` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from marsseg.calibrate import format_offsets
from marsseg.cli import ArgumentParser, add_decoding_flags, command, program
from marsseg.data import load_archive
from marsseg.data.synthetic import ensure_default_archive
from marsseg.device import resolve_device
from marsseg.fileio import check_output
from marsseg.predict import check_target, load_ensemble, predict_submission, require_test_set
from marsseg.submission import submission_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("search.predict", "marsseg-predict"), description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, required=True, help="model.pt from search.final")
    parser.add_argument("--data", type=Path, help="archive with a test_set (default: synthetic)")
    parser.add_argument(
        "--out", type=Path, default=Path("submission.csv"), help="CSV (default: submission.csv)"
    )
    add_decoding_flags(parser)
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="ignore the calibration offsets stored in the model file",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Before loading anything: the cheapest refusals first.
    check_target(args.out, args.force)
    check_output(args.out, what="submission")
    device = resolve_device(args.device)
    archive = load_archive(args.data or ensure_default_archive())
    require_test_set(archive)
    need = submission_bytes(len(archive.test_images), args.out.suffix == ".gz")
    check_output(args.out, need, what="submission")
    ensemble = load_ensemble(args.model)
    offsets = None if args.no_calibration else ensemble.offsets
    if ensemble.offsets is None:
        note = "no calibration offsets (the model file stores none)"
    elif args.no_calibration:
        note = "calibration offsets not applied (--no-calibration)"
    else:
        note = f"calibration offsets applied ({format_offsets(offsets)})"
    path = predict_submission(
        ensemble.models,
        archive,
        args.out,
        tta=not args.no_tta,
        metric_aware=not args.no_metric_aware,
        device=device,
        offsets=offsets,
        force=args.force,
    )
    print(f"wrote {path}: {note}")
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
