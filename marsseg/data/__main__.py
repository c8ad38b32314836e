"""`python -m marsseg.data`: inspect an archive, or write a synthetic one.

python -m marsseg.data inspect [ARCHIVE] [--out DIR] [--log]
python -m marsseg.data synth --out PATH [--n-train N] [--n-test M] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from marsseg.classes import IMAGE_HEIGHT, IMAGE_WIDTH
from marsseg.cli import COUNT, SEED, ArgumentParser, command, program
from marsseg.data import (
    class_statistics,
    clean_archive,
    ensure_default_archive,
    format_statistics,
    load_archive,
    make_archive,
)
from marsseg.data.figures import plot_class_distribution, plot_samples
from marsseg.data.split import contains_class
from marsseg.data.synthetic import default_archive_path
from marsseg.errors import ConfigError
from marsseg.fileio import check_output, check_writable


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("marsseg.data", "marsseg-data"), description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="print class statistics and write the data figures"
    )
    inspect.add_argument(
        "archive",
        nargs="?",
        type=Path,
        help="an .npz archive (default: the synthetic one, generated on first use)",
    )
    inspect.add_argument(
        "--out", type=Path, help="folder for the PNGs (default: results/inspect/<archive name>)"
    )
    inspect.add_argument(
        "--samples", type=COUNT, default=12, help="images in the sample grid (default 12)"
    )
    inspect.add_argument(
        "--log", action="store_true", help="log scale for the class-distribution chart"
    )
    inspect.add_argument("--seed", type=SEED, default=0, help="which samples are drawn (default 0)")

    synth = commands.add_parser("synth", help="write a synthetic archive in the challenge's format")
    synth.add_argument("--out", type=Path, required=True, help="path of the .npz to write")
    synth.add_argument(
        "--n-train",
        type=COUNT,
        default=2615,
        help="training images, outliers included (default 2615)",
    )
    synth.add_argument("--n-test", type=COUNT, default=1000, help="test images (default 1000)")
    synth.add_argument("--seed", type=SEED, default=0, help="generator seed (default 0)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def inspect(args: argparse.Namespace) -> None:
    source = args.archive or default_archive_path()
    out = check_writable(args.out or Path("results") / "inspect" / Path(source).stem)
    if args.archive is None:
        print("no archive given: using the synthetic default (generated on first use)")
    path = args.archive or ensure_default_archive()
    archive = load_archive(path)
    test = (
        f", {len(archive.test_images)} test images"
        if archive.test_images is not None
        else ", no test set"
    )
    print(f"archive: {path} ({len(archive)} training images{test})")
    clean, report = clean_archive(archive)
    print(report.summary())
    if args.samples > len(clean):
        raise ConfigError(
            f"--samples {args.samples}: the cleaned archive holds only {len(clean)} images"
        )
    stats = class_statistics(clean.masks)
    print(f"\nclass statistics of the {len(clean)} cleaned training masks:")
    print(format_statistics(stats))

    rng = np.random.default_rng(args.seed)
    # Show big-rock images too: with ~2.5% of images holding one, a uniform draw often shows none.
    rocky = np.flatnonzero(contains_class(clean.masks))
    n_rocky = min(len(rocky), args.samples // 3)
    picks = np.concatenate(
        [
            rng.choice(rocky, n_rocky, replace=False),
            rng.choice(len(clean), args.samples - n_rocky, replace=False),
        ]
    )
    samples = plot_samples(
        clean.images, clean.masks, out / "samples.png", np.unique(picks), title=Path(path).name
    )
    chart = plot_class_distribution(stats, out / "class_distribution.png", log=args.log)
    print(f"\nwrote {samples} and {chart}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "inspect":
        inspect(args)
    else:
        # uint8 images and masks, uncompressed: refuse a disk that cannot hold them up front.
        need = (2 * args.n_train + args.n_test) * IMAGE_HEIGHT * IMAGE_WIDTH
        check_output(args.out, need, what="archive")
        print(f"wrote {make_archive(args.out, args.n_train, args.n_test, args.seed)}")
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
