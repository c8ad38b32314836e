"""`python -m search.run`: search architectures, losses, augmentation and oversampling on Ray.

Optuna's TPE proposes each trial from a define-by-run space (`--space`), ASHA stops poor trials
early, and every trial trains with `marsseg.train.fit`. With no flags it runs a local Ray on the
synthetic archive with a budget of a few minutes on a laptop CPU; on a cluster started with
`ray up cluster.yaml`, pass `--address auto --storage s3://bucket/prefix`.

At the end it prints a leaderboard and a one-line account of Ray's overhead, and writes, in the
experiment folder: `leaderboard.csv`, `best_config.yaml` (a training config with provenance),
`optuna.db` (the study, for optuna-dashboard), `timeline.csv` (when each trial started and each
epoch's result arrived; see `search.timeline`) and the trials' TensorBoard files
(`tensorboard --logdir <experiment>`).
Re-running with the same `--name` (or `--resume`) continues an interrupted experiment.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray import tune
from ray.tune import ResultGrid

from marsseg.cli import run_cli
from marsseg.config import TrainConfig, preset
from marsseg.data import MarsArchive, load_clean_archive
from marsseg.data.synthetic import default_archive_path
from marsseg.errors import ConfigError, SearchError
from search.capacity import (
    AUTOSCALER_CONFIG,
    capacity,
    check_trial_resources,
    concurrent_trials,
    connect,
)
from search.packing import check_gpu_packing
from search.results import (
    BASE_CONFIG,
    BEST_CONFIG,
    LEADERBOARD,
    OBJECTIVE,
    leaderboard,
    summarise,
    with_provenance,
)
from search.storage import check_shared_storage, check_storage
from search.timeline import TIMELINE, read_timeline
from search.timeline import summarise as summarise_timeline
from search.tuner import (
    SAMPLERS,
    SCHEDULERS,
    STUDY_FILE,
    driver_folder,
    make_tuner,
    restore_tuner,
)
from spaces import SPACE_NAMES, get_space

SYNTHETIC_IMAGES = 256
"""Images the no-flag run trains on (of the synthetic default's 2505), so it takes minutes."""
SHOWN_COLUMNS = ["rank", "trial", "arch", "loss", "augment", "oversample", "epochs", OBJECTIVE]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search.run",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--config", type=Path, help="YAML file with any of these flags as keys (flags win)")
    add("--space", default="default", help=f"search space: {', '.join(SPACE_NAMES)}")
    add("--data", type=Path, help="archive .npz (default: the synthetic one)")
    add(
        "--limit-images",
        type=int,
        help=f"train on the first N cleaned images (default: all; {SYNTHETIC_IMAGES} "
        "on the synthetic default)",
    )
    add("--train-config", type=Path, help="base training config for what the space leaves fixed")
    add("--num-samples", type=int, default=8, help="trials to run")
    add("--max-epochs", type=int, default=4, help="epochs of a trial that is never stopped")
    add("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    add("--reduction-factor", type=float, default=2, help="ASHA: keep 1/N at each rung")
    add("--gpus-per-trial", type=float, help="GPUs per trial; 0.25 packs 4 (default: 1 if any)")
    add("--cpus-per-trial", type=float, default=1, help="CPUs per trial (torch threads)")
    add("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    add("--address", help="Ray address: 'auto' joins a cluster from `ray up` (default: local)")
    add(
        "--storage",
        default="experiments",
        help="experiments folder; on a cluster s3://bucket/prefix, or file:///path for a folder "
        "every node mounts",
    )
    add("--name", help="experiment name (default: <space>-<time>); reuse it to resume")
    add("--resume", action="store_true", help="continue the experiment --name (must exist)")
    add("--seed", type=int, default=0, help="seed of the sampler and of every trial's training")
    add("--time-budget", type=float, help="stop the whole search after this many seconds")
    add("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler of the trials")
    add("--scheduler", default="asha", choices=SCHEDULERS, help="fifo: no early stopping")
    add(
        "--no-reference-trial",
        action="store_true",
        help="do not run the space's starting point (the reference recipe) first",
    )
    add(
        "--checkpoint-every",
        type=int,
        default=1,
        help="checkpoint every N epochs and the last; a retried trial redoes up to N-1 epochs",
    )
    add(
        "--no-reuse-actors",
        action="store_true",
        help="start a fresh Ray actor for every trial instead of reusing a finished one's",
    )
    add("--final", action="store_true", help="then export the best config and run search.final")
    add("--final-arch", default="marsseg", help="architecture --final retrains, or 'any'")
    add("--final-folds", type=int, help="--final trains a k-fold ensemble (see search.final)")
    add("--final-epochs", type=int, help="--final's epochs (default: derived from the search)")
    add("--force", action="store_true", help="let --final overwrite an existing submission")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags, with defaults taken from `--config FILE` where it sets them."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**_config_file_defaults(parser, first.config))
    return parser.parse_args(argv)


def _config_file_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions} - {"help", "config"}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        action = next(a for a in parser._actions if a.dest == dest)
        defaults[dest] = action.type(value) if action.type and value is not None else value
    return defaults


def load_data(args: argparse.Namespace) -> tuple[MarsArchive, str]:
    """The cleaned archive the trials train on, and where it came from."""
    source = str(args.data) if args.data else f"synthetic ({default_archive_path()})"
    archive, report = load_clean_archive(args.data)
    print(f"data: {source}: {report.summary()}")
    limit = args.limit_images or (None if args.data else SYNTHETIC_IMAGES)
    if limit is not None and limit < len(archive):
        archive = archive.subset(np.arange(limit))
        print(f"data: training on the first {limit} cleaned images")
    return archive, source


def base_config(args: argparse.Namespace) -> TrainConfig:
    """What the space does not sample: the base config, with the flags' epochs and seed."""
    base = TrainConfig.load(args.train_config) if args.train_config else preset("reference")
    return base.replace(max_epochs=args.max_epochs, seed=args.seed)


def check_args(args: argparse.Namespace) -> None:
    for flag in ("num_samples", "max_epochs", "grace_period", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.reduction_factor <= 1:
        raise ConfigError("--reduction-factor must be > 1")
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial or 0) < 0:
        raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name of the experiment to continue")
    for flag, known in (("sampler", SAMPLERS), ("scheduler", SCHEDULERS)):
        if getattr(args, flag) not in known:  # a --config file bypasses argparse's choices
            raise ConfigError(f"--{flag} must be one of {', '.join(known)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    space = get_space(args.space)
    archive, source = load_data(args)
    base = base_config(args)
    storage = check_storage(args.storage)
    name = args.name or f"{args.space}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = f"{storage.path.rstrip('/')}/{name}"

    connect(args.address)
    # Only a cluster joined by address can have an autoscaler; a fresh local Ray never grows.
    cap = capacity(AUTOSCALER_CONFIG if args.address else None)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if cap.gpus else 0.0)
    check_trial_resources(cap, args.cpus_per_trial, gpus)
    check_shared_storage(storage, cap)
    # Trials sharing a GPU: measure the heaviest on one and refuse a packing that cannot fit.
    check_gpu_packing(base, len(archive), gpus)
    concurrent = args.max_concurrent or concurrent_trials(cap, args.cpus_per_trial, gpus)
    print(
        f"ray: {cap.describe()}; trials use "
        f"{args.cpus_per_trial:g} CPU + {gpus:g} GPU, {concurrent} at a time"
    )

    folder = driver_folder(experiment)
    restoring = tune.Tuner.can_restore(experiment)
    if args.resume and not restoring:
        raise SearchError(f"--resume: no experiment to continue at {experiment}")
    if restoring:
        print(f"resuming experiment {experiment}")
        base = TrainConfig.load(folder / BASE_CONFIG)  # the experiment's, whatever the flags say
        tuner = restore_tuner(
            experiment, archive, base, args.cpus_per_trial, gpus, args.checkpoint_every
        )
    else:
        base = base.replace(
            provenance={"data": source, "data_checksum": archive.checksum(), "space": args.space}
        )
        base.save(folder / BASE_CONFIG)
        tuner = make_tuner(
            space=space,
            archive=archive,
            base=base,
            name=name,
            storage=storage.path,
            experiment=experiment,
            num_samples=args.num_samples,
            max_epochs=args.max_epochs,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=gpus,
            max_concurrent=concurrent,
            seed=args.seed,
            time_budget=args.time_budget,
            sampler=args.sampler,
            scheduler=args.scheduler,
            reference_trial=not args.no_reference_trial,
            checkpoint_every=args.checkpoint_every,
            reuse_actors=not args.no_reuse_actors,
        )
    results = tuner.fit()
    report(results, experiment, base)
    timeline = folder / TIMELINE
    if timeline.is_file():
        print(summarise_timeline(read_timeline(timeline)).line())
    if args.final:
        run_final(args, experiment)
    return 0


def run_final(args: argparse.Namespace, experiment: str) -> None:
    """search -> export -> final in one go: the best config of `--final-arch`, retrained."""
    from search import export, final

    out = Path("results") / Path(experiment.rstrip("/")).name
    export.export(experiment, top_k=5, arch=args.final_arch, out=out)
    final_args = ["--config", str(out / BEST_CONFIG), "--out", str(out / "final")]
    if args.data:
        final_args += ["--data", str(args.data)]
    if args.final_folds:
        final_args += ["--folds", str(args.final_folds)]
    if args.final_epochs:
        final_args += ["--epochs", str(args.final_epochs)]
    if args.force:
        final_args.append("--force")
    # The folds run as Ray tasks on the search's own Ray, with a trial's resources each.
    final_args += ["--cpus-per-trial", f"{args.cpus_per_trial:g}"]
    if args.gpus_per_trial is not None:
        final_args += ["--gpus-per-trial", f"{args.gpus_per_trial:g}"]
    if args.address:
        final_args += ["--address", args.address]
    final.main(final_args)


def report(results: ResultGrid, experiment: str, base: TrainConfig) -> None:
    """Print the leaderboard; write leaderboard.csv and best_config.yaml beside the study."""
    summaries = summarise(results, base)
    if not summaries:
        print(f"no trial reported a result; see the trial logs under {experiment}")
        return
    table = leaderboard(summaries)
    shown = SHOWN_COLUMNS + [c for c in table if c.startswith("val_iou")]
    print("\n" + table[shown].to_string(index=False))
    folder = driver_folder(experiment)
    table.to_csv(folder / LEADERBOARD, index=False)
    checksum = base.provenance.get("data_checksum", "")  # hashed once, when the search began
    with_provenance(summaries[0], experiment, checksum).save(folder / BEST_CONFIG)
    print(f"\nwrote {folder / LEADERBOARD} and {folder / BEST_CONFIG} ({summaries[0].trial_id})")
    print(f"watch it: tensorboard --logdir {experiment}")
    print(f"          optuna-dashboard sqlite:///{folder / STUDY_FILE}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
