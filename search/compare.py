"""`python -m search.compare`: configurations against each other at equal budget, several seeds.

    python -m search.compare --data mars_for_students.npz --max-epochs 20 --seeds 0 1 2 \\
        --candidate reference=preset:reference \\
        --candidate searched=results/default-1/best_config.yaml

One search trial is one seed on one validation split: its score carries that seed's luck, and
the search picked it for being lucky. This retrains every candidate with each seed on one fixed
validation split and the same epoch budget, as Ray tasks (packed on GPUs with
`--gpus-per-trial 0.25`, spread over a cluster with `--address auto`), and writes to `--out`:
`runs.csv` (one row per run), `comparison.csv` (mean and spread per candidate) and
`comparison.md` (the table, the gain over the first candidate, the budget and the command).

Every epoch of every run prints one line as it ends (`fast seed 1  epoch   3/20 ...`), and each
run its scores when it ends; `runs.csv` is rewritten as each run finishes. Every run checkpoints
each epoch under `--out` (`runs/`), so rerunning the same command after a stop keeps the
finished runs and continues the others from their last epoch; a rerun with other candidates,
seeds, epochs, split or data is refused, naming what differs (`--force` starts over).

A run that fails is named with its reason and the others go on: the summary covers the runs
that finished (a candidate with none is left out, with a note) and the command then exits with
code 2, naming every failed run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from marsseg.cli import SEED, ArgumentParser, add_max_epochs_flag, command, number_flag, program
from marsseg.config import PRESETS, TrainConfig, preset
from marsseg.data import MarsArchive, load_clean_archive, train_val_split
from marsseg.errors import ConfigError
from marsseg.fileio import atomic_path, check_writable
from marsseg.train.keys import IOU_KEYS
from search.capacity import start_ray
from search.runstore import RunStore
from search.tasks import (
    SCORES,
    Failures,
    Run,
    add_resource_flags,
    train_runs,
)

PRESET_PREFIX = "preset:"
RUNS = "runs.csv"
RUNS_DIR = "runs"
"""The runs' checkpoints and results (a `RunStore`), what a rerun continues."""


@dataclass(frozen=True)
class Candidate:
    name: str
    source: str
    config: TrainConfig


def parse_candidate(text: str) -> Candidate:
    """`NAME=preset:reference` or `NAME=path/to/config.yaml`."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ConfigError(f"--candidate must be NAME=preset:NAME or NAME=CONFIG.yaml, got {text!r}")
    if source.startswith(PRESET_PREFIX):
        config = preset(source.removeprefix(PRESET_PREFIX))
    elif Path(source).is_file():
        config = TrainConfig.load(source)
    else:
        presets = ", ".join(PRESET_PREFIX + p for p in PRESETS)
        raise ConfigError(f"--candidate {name}: no config file {source!r} (or use {presets})")
    return Candidate(name, source, config)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("search.compare", "marsseg-compare"),
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    add = parser.add_argument
    add("--candidate", action="append", required=True, help="NAME=preset:NAME or NAME=CONFIG")
    add("--data", type=Path, help="archive .npz (default: the synthetic one)")
    add_max_epochs_flag(parser, "the equal budget: the most epochs of every run (required)")
    add("--seeds", type=SEED, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    add(
        "--val-fraction",
        type=number_flag(0, 1, low_open=True, high_open=True),
        default=0.2,
        help="share of images held out for scoring (default: 0.2)",
    )
    add("--split-seed", type=SEED, default=0, help="seed of the one validation split (default: 0)")
    add_resource_flags(parser)
    add(
        "--out",
        type=Path,
        default=Path("results") / "comparison",
        help="output folder (default: results/comparison)",
    )
    add(
        "--force",
        action="store_true",
        help="start over instead of continuing the runs an earlier comparison left in --out",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_epochs is None:
        parser.error("the following arguments are required: --max-epochs")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds repeats a seed: {args.seeds}")
    return args


def run_all(
    candidates: Sequence[Candidate],
    seeds: Sequence[int],
    archive: MarsArchive,
    split: tuple[np.ndarray, np.ndarray],
    epochs: int,
    cpus: float,
    gpus: float,
    out: Path,
    store: RunStore | None = None,
) -> tuple[pd.DataFrame, Failures]:
    """Every (candidate, seed) as a Ray task at once (Ray queues what does not fit), and the
    runs that failed; `out / runs.csv` holds every finished run as soon as it has finished.
    With `store` (opened for this comparison) finished runs are kept and the others continue."""
    runs = {}
    for candidate in candidates:
        for seed in seeds:
            config = candidate.config.replace(seed=seed, max_epochs=epochs)
            runs[(candidate.name, seed)] = Run(f"{candidate.name} seed {seed}", config, split)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    failures = Failures()
    for key, row, reason in train_runs(runs, archive, cpus=cpus, gpus=gpus, store=store):
        name = runs[key].name
        if reason is not None:
            failures.add(name, reason)
            continue
        tqdm.write(f"{name}: val mIoU {row['val_miou']:.4f} at epoch {row['best_epoch']}")
        rows[key] = {"candidate": key[0], "seed": key[1], **row}
        write_runs([rows[k] for k in runs if k in rows], out / RUNS)
    return pd.DataFrame([rows[k] for k in runs if k in rows]), failures


def write_runs(rows: list[dict[str, Any]], path: Path) -> None:
    """`runs.csv` in the candidates' and seeds' order, replaced whole: a reader never sees half
    a file, however the command ends."""
    with atomic_path(path) as temp:
        pd.DataFrame(rows).to_csv(temp, index=False)


def seed_statistics(runs: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation (over seeds) of every score, one row per candidate that has
    a finished run."""
    grouped = runs.groupby("candidate", sort=False)[[*SCORES, "train_s"]]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    table.insert(0, "seeds", runs.groupby("candidate", sort=False).size())
    return table.loc[[name for name in order if name in table.index]].reset_index()


def markdown(summary: pd.DataFrame, facts: dict[str, str]) -> str:
    """The comparison table, with the gain of each candidate over the first one."""
    headers = ["candidate", "seeds", "val mIoU", "gain"] + [
        key.removeprefix("val_iou_").replace("_", " ") for key in IOU_KEYS.values()
    ]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    baseline = summary["val_miou_mean"].iloc[0]
    for _, row in summary.iterrows():
        cells = [row["candidate"], str(row["seeds"])]
        cells += [_mean_std(row, "val_miou"), f"{row['val_miou_mean'] - baseline:+.4f}"]
        cells += [_mean_std(row, key) for key in IOU_KEYS.values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(lines) + "\n"


def _mean_std(row: pd.Series, key: str) -> str:
    spread = row[f"{key}_std"]
    return f"{row[f'{key}_mean']:.4f} ± {0.0 if np.isnan(spread) else spread:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    candidates = [parse_candidate(text) for text in args.candidate]
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"--candidate names must differ, got {names}")
    check_writable(args.out)  # before the data is loaded or any run trains
    archive, report = load_clean_archive(args.data)
    print(f"data: {args.data or 'synthetic'}: {report.summary()}")
    split = train_val_split(archive.masks, args.val_fraction, args.split_seed)

    epochs = args.max_epochs
    store = RunStore(args.out / RUNS_DIR)
    plan = {
        "stage": "compare",
        "candidates": {c.name: c.config.to_dict() for c in candidates},
        "seeds": args.seeds,
        "epochs": epochs,
        "val_fraction": args.val_fraction,
        "split_seed": args.split_seed,
        "data_checksum": archive.checksum(),
    }
    started = start_ray(args.address, args.cpus_per_trial, args.gpus_per_trial)
    cpus, gpus = started.cpus, started.gpus
    finished = store.open(plan, force=args.force)
    if finished:
        print(f"continuing the comparison in {args.out}: {len(finished)} run(s) finished, kept")
    start = time.perf_counter()
    try:
        runs, failures = run_all(
            candidates, args.seeds, archive, split, epochs, cpus, gpus, args.out, store
        )
    finally:
        store.discard_if_empty()
    wall = time.perf_counter() - start
    if runs.empty:
        failures.check("no run finished; nothing to compare")

    summary = seed_statistics(runs, names)
    line = "python -m search.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    facts = {
        "candidates": "; ".join(f"{c.name} = {c.source}" for c in candidates),
        "budget": f"at most {epochs} epochs per run (each config's own early stopping "
        f"may end it sooner), seeds {' '.join(map(str, args.seeds))}",
        "validation": f"one stratified split, {len(split[1])} of {len(archive)} cleaned images "
        f"(fraction {args.val_fraction:g}, split seed {args.split_seed}); scores at each run's "
        "best epoch",
        "device time": f"{runs['train_s'].sum() / 60:.1f} min of training over {len(runs)} runs "
        f"({wall / 60:.1f} min wall, {cpus:g} CPU + {gpus:g} GPU per run)",
        "command": f"`{line}`",
    }
    if failures:
        facts["failed runs"] = "; ".join(failures.lines)
    missing = [name for name in names if name not in set(summary["candidate"])]
    if missing:
        facts["left out"] = f"{', '.join(missing)}: no run finished"
    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / "comparison.csv", index=False)
    text = markdown(summary, facts)
    (args.out / "comparison.md").write_text("# Comparison at equal budget\n\n" + text)
    print("\n" + text + f"\nwrote {args.out / 'comparison.md'}")
    failures.check(f"the other runs are in {args.out / RUNS} and {args.out / 'comparison.md'}")
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
