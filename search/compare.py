"""`python -m search.compare`: configurations against each other at equal budget, several seeds.

    python -m search.compare --data mars_for_students.npz --epochs 20 --seeds 0 1 2 \\
        --candidate reference=preset:reference \\
        --candidate searched=results/default-1/best_config.yaml

One search trial is one seed on one validation split: its score carries that seed's luck, and
the search picked it for being lucky. This retrains every candidate with each seed on one fixed
validation split and the same epoch budget, as Ray tasks (packed on GPUs with
`--gpus-per-trial 0.25`, spread over a cluster with `--address auto`), and writes to `--out`:
`runs.csv` (one row per run), `comparison.csv` (mean and spread per candidate) and
`comparison.md` (the table, the gain over the first candidate, the budget and the command).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from marsseg.cli import run_cli
from marsseg.config import PRESETS, TrainConfig, preset
from marsseg.data import MarsArchive, load_clean_archive, train_val_split
from marsseg.errors import ConfigError
from marsseg.fileio import check_writable
from marsseg.train.keys import IOU_KEYS
from search.tasks import SCORES, add_resource_flags, start_ray, task_threads, train_run

PRESET_PREFIX = "preset:"


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m search.compare",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    add = parser.add_argument
    add("--candidate", action="append", required=True, help="NAME=preset:NAME or NAME=CONFIG")
    add("--data", type=Path, help="archive .npz (default: the synthetic one)")
    add("--epochs", type=int, required=True, help="the equal budget: max epochs of every run")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    add("--val-fraction", type=float, default=0.2, help="share of images held out for scoring")
    add("--split-seed", type=int, default=0, help="seed of the one validation split")
    add_resource_flags(parser)
    add("--out", type=Path, default=Path("results") / "comparison", help="output folder")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise ConfigError("--epochs must be >= 1")
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
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
) -> pd.DataFrame:
    """Every (candidate, seed) as a Ray task at once; Ray queues what does not fit."""
    data = ray.put(archive)  # one copy in the object store for every run
    remote = train_run.options(num_cpus=cpus, num_gpus=gpus)
    jobs = {}
    for candidate in candidates:
        for seed in seeds:
            config = candidate.config.replace(seed=seed, max_epochs=epochs)
            jobs[(candidate.name, seed)] = remote.remote(config, data, split, task_threads(cpus))
    rows = []
    for (name, seed), job in jobs.items():
        row = ray.get(job)
        best = f"val mIoU {row['val_miou']:.4f} at epoch {row['best_epoch']}"
        print(f"{name} seed {seed}: {best}", flush=True)
        rows.append({"candidate": name, "seed": seed, **row})
    return pd.DataFrame(rows)


def seed_statistics(runs: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation (over seeds) of every score, one row per candidate."""
    grouped = runs.groupby("candidate", sort=False)[[*SCORES, "train_s"]]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    table.insert(0, "seeds", runs.groupby("candidate", sort=False).size())
    return table.loc[list(order)].reset_index()


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

    gpus = start_ray(args.address, args.cpus_per_trial, args.gpus_per_trial)
    start = time.perf_counter()
    runs = run_all(candidates, args.seeds, archive, split, args.epochs, args.cpus_per_trial, gpus)
    wall = time.perf_counter() - start

    summary = seed_statistics(runs, names)
    command = "python -m search.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    facts = {
        "candidates": "; ".join(f"{c.name} = {c.source}" for c in candidates),
        "budget": f"at most {args.epochs} epochs per run (each config's own early stopping "
        f"may end it sooner), seeds {' '.join(map(str, args.seeds))}",
        "validation": f"one stratified split, {len(split[1])} of {len(archive)} cleaned images "
        f"(fraction {args.val_fraction:g}, split seed {args.split_seed}); scores at each run's "
        "best epoch",
        "device time": f"{runs['train_s'].sum() / 60:.1f} min of training over {len(runs)} runs "
        f"({wall / 60:.1f} min wall, {args.cpus_per_trial:g} CPU + {gpus:g} GPU per run)",
        "command": f"`{command}`",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out / "runs.csv", index=False)
    summary.to_csv(args.out / "comparison.csv", index=False)
    text = markdown(summary, facts)
    (args.out / "comparison.md").write_text("# Comparison at equal budget\n\n" + text)
    print("\n" + text + f"\nwrote {args.out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
