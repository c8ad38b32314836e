"""`python -m marsseg.train`: train one configuration and keep its outputs in one folder.

    python -m marsseg.train --preset reference --epochs 5
    python -m marsseg.train --config best_config.yaml --data mars_for_students.npz --out runs/best

The folder gets `config.yaml` (the resolved config), `metrics.csv` (one row per epoch),
`checkpoint.pt` (the latest full state: rerunning the same command resumes from it),
`checkpoint.prev.pt` (the one before: a rerun whose latest cannot be read resumes from this one,
or starts afresh when neither can, printing which) and `model.pt` (the best weights with their
config, loadable with `weights_only=True`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from marsseg.cli import run_cli
from marsseg.config import PRESETS, TrainConfig, preset
from marsseg.data import load_clean_archive
from marsseg.data.synthetic import default_archive_path
from marsseg.device import resolve_device
from marsseg.fileio import check_writable
from marsseg.predict import save_models
from marsseg.train import EpochState, fit
from marsseg.train.progress import epoch_line

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
MODEL = "model.pt"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m marsseg.train", description=__doc__.splitlines()[0]
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a YAML or JSON training config")
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named config (default: reference)"
    )
    parser.add_argument(
        "--data", type=Path, help="an .npz archive (default: the synthetic one, made on first use)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<name>-<time>)")
    parser.add_argument("--epochs", type=int, help="override max_epochs")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for online augmentation"
    )
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The config the flags describe, and a short name for the output folder."""
    if args.config is not None:
        config, name = TrainConfig.load(args.config), args.config.stem
    else:
        name = args.preset or "reference"
        config = preset(name)
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["max_epochs"] = args.epochs
    if args.seed is not None:
        overrides["seed"] = args.seed
    return config.replace(**overrides), name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config, name = resolve_config(args)
    # Everything that can refuse does so before the data is loaded or anything is written.
    device = resolve_device(args.device)
    out = check_writable(args.out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.data is None:
        print(f"no --data: using the synthetic archive {default_archive_path()}")
    archive, report = load_clean_archive(args.data)
    print(report.summary())
    checkpoint, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    resume = [path for path in (checkpoint, previous) if path.is_file()]  # newest first
    if resume:
        # fit checks that its config is this one, and falls back past an unreadable file
        print(f"resuming from {resume[0]}")
    else:
        config.save(out / "config.yaml")
    print(f"training {config.model.name} for up to {config.max_epochs} epochs -> {out}")

    bar = tqdm(total=config.max_epochs, unit="epoch", dynamic_ncols=True)
    saved = []  # this run's checkpoints

    def on_epoch(metrics: dict[str, Any], state: EpochState) -> None:
        bar.update(metrics["epoch"] - bar.n)
        bar.set_postfix(
            loss=f"{metrics['train_loss']:.4f}", miou=f"{metrics.get('val_miou', 0):.4f}"
        )
        bar.write(epoch_line(metrics, config.max_epochs))
        pd.DataFrame(state.history).to_csv(out / "metrics.csv", index=False)
        # Keep the one before as the previous checkpoint, unless it is an unreadable one that
        # this run fell back past (or started afresh without): that one is just replaced.
        keep = bool(saved) or state.resumed_from == checkpoint
        saved.append(state.save(checkpoint, previous=previous if keep else None))

    with bar:
        result = fit(
            config,
            archive,
            on_epoch=on_epoch,
            checkpoint=resume or None,
            device=device,
            num_threads=args.threads,
            workers=args.workers,
        )
    save_models(out / MODEL, config, [result.model])
    best = f"best val mIoU {result.best_score:.4f} at epoch {result.best_epoch}"
    print(f"done ({result.stop_reason}); {best if result.best_epoch else 'no validation set'}")
    print(f"wrote {out / MODEL}, {out / 'metrics.csv'}, {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
