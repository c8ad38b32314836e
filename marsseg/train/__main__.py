"""`python -m marsseg.train`: train one configuration and keep its outputs in one folder.

    python -m marsseg.train --preset reference --max-epochs 5
    python -m marsseg.train --config best_config.yaml --data mars_for_students.npz --out runs/best

The folder (by default `runs/<config file stem or preset>`, `-seed<N>` added with `--seed`, so
the same command always names the same folder) gets `config.yaml` (the resolved config),
`metrics.csv` (one row per epoch), `checkpoint.pt` (the latest full state: rerunning the same
command resumes from it), `checkpoint.prev.pt` (the one before: a rerun whose latest cannot be
read resumes from this one, or starts afresh when neither can, printing which) and `model.pt`
(the best weights with their config, loadable with `weights_only=True`).

A rerun keeps the run's own `max_epochs` unless `--max-epochs` changes it: more epochs extend
the run, even a finished one (not one that early stopping ended), fewer than it has run are
refused. `--fresh` starts over, after moving the run's files into a `replaced-<time>` subfolder.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from marsseg.cli import (
    SEED,
    WORKERS,
    ArgumentParser,
    add_cpus_flag,
    add_max_epochs_flag,
    command,
    program,
    torch_threads,
)
from marsseg.config import PRESETS, TrainConfig, preset
from marsseg.data import load_clean_archive, train_val_split
from marsseg.data.synthetic import default_archive_path
from marsseg.device import resolve_device
from marsseg.errors import CheckpointError, ConfigError
from marsseg.fileio import check_writable
from marsseg.predict import save_models
from marsseg.train import EpochState, fit
from marsseg.train.progress import epoch_line
from marsseg.train.state import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    CheckpointFiles,
    check_continuable,
    ended_for_good,
    read_checkpoint,
)

CONFIG = "config.yaml"
METRICS = "metrics.csv"
MODEL = "model.pt"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, PREVIOUS_CHECKPOINT, MODEL)
"""What a run writes into its folder: all that `--fresh` moves aside."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("marsseg.train", "marsseg-train"), description=__doc__.splitlines()[0]
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a YAML or JSON training config")
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named config (default: reference)"
    )
    parser.add_argument(
        "--data", type=Path, help="an .npz archive (default: the synthetic one, made on first use)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder, where a rerun resumes (default: runs/<config stem or preset>, "
        "with -seed<N> when --seed is given)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming: the run's files in the output folder are moved "
        "into a replaced-<time> subfolder first (nothing is deleted)",
    )
    add_max_epochs_flag(
        parser,
        "override max_epochs; on a rerun, more than the run's extend it, even once finished "
        "(default: the config's, or the run's own on a rerun)",
    )
    parser.add_argument("--seed", type=SEED, help="override the seed")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_cpus_flag(parser, "CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--workers",
        type=WORKERS,
        default=0,
        help="DataLoader workers for online augmentation (default: 0)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The config the flags describe, and a short name for the output folder."""
    if args.config is not None:
        config, name = TrainConfig.load(args.config), args.config.stem
    else:
        name = args.preset or "reference"
        config = preset(name)
    overrides: dict[str, Any] = {}
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    if args.seed is not None:
        overrides["seed"] = args.seed
    return config.replace(**overrides), name


def default_out(name: str, seed: int | None) -> Path:
    """`runs/<name>[-seed<N>]`, with no time in it: the same command names the same folder, so
    rerunning it resumes."""
    return Path("runs") / (name if seed is None else f"{name}-seed{seed}")


def continued_config(
    config: TrainConfig, max_epochs: int | None, checkpoints: Sequence[Path]
) -> TrainConfig:
    """The config a rerun continues the run of `checkpoints` (newest first) with, refusing
    before any data is loaded what `fit` would refuse after (`check_continuable`).

    The run keeps its own `max_epochs` unless `max_epochs` (the flag) is given: a rerun of the
    command that extended a run does not cut it back to the config's. A run that early stopping
    ended stays ended whatever the flag says, as in `fit`. With no readable checkpoint, `config`
    as it is: `fit` reports the damaged files and starts afresh.
    """
    newest = _newest_readable(checkpoints)
    if newest is None:
        return config
    path, state = newest
    saved, epochs = TrainConfig.from_dict(state["config"]), state["epoch"]
    if max_epochs is None:
        if config.max_epochs != saved.max_epochs:
            print(f"keeping the run's max_epochs {saved.max_epochs} (--max-epochs changes it)")
        config = config.replace(max_epochs=saved.max_epochs)
    try:
        check_continuable(path, saved, epochs, config)
    except ConfigError as error:
        raise ConfigError(f"{error}; --fresh starts over, --out another folder keeps it") from None
    if ended_for_good(state["history"]):
        if config.max_epochs > saved.max_epochs:
            print(
                f"the run in {path.parent} stopped early at epoch {epochs}: more epochs do not "
                "reopen it (--fresh starts it over)"
            )
        config = config.replace(max_epochs=saved.max_epochs)
    return config


def _newest_readable(paths: Sequence[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The first checkpoint of `paths` that can be read, and what it holds."""
    for path in paths:
        try:
            return path, read_checkpoint(path)
        except CheckpointError:
            continue
    return None


def move_aside(out: Path) -> Path | None:
    """`--fresh`: move the run's files (`RUN_FILES`) in `out` into a new `replaced-<time>`
    subfolder and return it (None: nothing to move). Starting over deletes nothing, and leaves
    whatever else `out` holds where it is."""
    present = [out / name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):  # a second --fresh within the same second gets its own folder
        aside = out / f"replaced-{stamp}{f'-{n}' if n > 1 else ''}"
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    for path in present:
        os.replace(path, aside / path.name)
    return aside


def main(argv: Sequence[str] | None = None) -> int:
    """Train one configuration into its folder, resuming the run already there."""
    args = parse_args(argv)
    config, name = resolve_config(args)
    # Everything that can refuse does so before the data is loaded or anything is written.
    device = resolve_device(args.device)
    out = check_writable(args.out or default_out(name, args.seed))
    checkpoints = CheckpointFiles(out)
    resume = [] if args.fresh else checkpoints.existing()
    if resume:
        config = continued_config(config, args.max_epochs, resume)
    if args.data is None:
        print(f"no --data: using the synthetic archive {default_archive_path()}")
    archive, report = load_clean_archive(args.data)
    print(report.summary())
    if config.val_fraction > 0:  # a split that leaves a side empty is refused before training
        train_val_split(archive.masks, config.val_fraction, config.seed)
    if args.fresh and (aside := move_aside(out)):
        print(f"--fresh: moved the previous run's files to {aside}")
    if resume:
        # fit falls back past an unreadable file, saying so
        print(f"resuming from {resume[0]}")
    print(f"training {config.model.name} for up to {config.max_epochs} epochs -> {out}")

    # On a terminal only: in a log the epoch lines say the same, and a failed run's one error
    # line is not buried in a bar's redraws.
    bar = tqdm(total=config.max_epochs, unit="epoch", dynamic_ncols=True, disable=None)

    def on_epoch(metrics: dict[str, Any], state: EpochState) -> None:
        bar.update(metrics["epoch"] - bar.n)
        bar.set_postfix(
            loss=f"{metrics['train_loss']:.4f}", miou=f"{metrics.get('val_miou', 0):.4f}"
        )
        bar.write(epoch_line(metrics, config.max_epochs))
        if not checkpoints.saved:  # written with the first epoch: a failed start makes nothing
            config.save(out / CONFIG)  # a longer max_epochs is the run's from now on
        pd.DataFrame(state.history).to_csv(out / METRICS, index=False)
        checkpoints.save(state)

    with bar:
        result = fit(
            config,
            archive,
            on_epoch=on_epoch,
            checkpoint=resume or None,
            device=device,
            num_threads=torch_threads(args.cpus_per_trial),
            workers=args.workers,
        )
    save_models(out / MODEL, config, [result.model])
    best = f"best val mIoU {result.best_score:.4f} at epoch {result.best_epoch}"
    print(f"done ({result.stop_reason}); {best if result.best_epoch else 'no validation set'}")
    print(f"wrote {out / MODEL}, {out / METRICS}, {out / CONFIG}")
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
