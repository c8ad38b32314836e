"""`python -m search.export --name NAME`: write the top configurations of a search as YAML files.

    python -m search.export --name marsseg-1                      # top 5 MarsSeg configs
    python -m search.export --name default-1 --arch any --top-k 10 --out results/default-1
    python -m search.export --name marsseg-1 --storage s3://bucket/prefix
    python -m search.export experiments/marsseg-1                 # the folder (or URI) itself

Works on a finished or a running experiment. Each file is a full training config with its
provenance (trial, score, seed, data checksum, code version): `top-01-<trial>.yaml`, ... and
`best_config.yaml`, the first of them; `leaderboard.csv` beside them ranks every trial, and
`timeline.csv` (when the search recorded one) says what budget the search spent. `plots/`
holds the search's plots (see `search.plots`; `--no-plots` skips them).
`python -m search.final --config` trains one for real.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ray.tune import ExperimentAnalysis, ResultGrid

from marsseg.cli import COUNT, ArgumentParser, command, program
from marsseg.errors import SearchError
from marsseg.fileio import check_writable
from marsseg.models import list_models
from search.experiment import (
    BEST_CONFIG,
    DEFAULT_STORAGE,
    LEADERBOARD,
    TIMELINE,
    Experiment,
    check_name,
)
from search.plots import PLOTS, write_experiment_plots
from search.results import (
    leaderboard,
    rank_trials,
    with_provenance,
    write_leaderboard,
)
from search.timeline import read_timeline, summarise_timeline

SUMMARY_COLUMNS = ["rank", "trial", "arch", "loss", "augment", "epochs", "best_epoch", "val_miou"]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program("search.export", "marsseg-export"), description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "experiment",
        nargs="?",
        help="the experiment's folder or URI (instead of --name and --storage)",
    )
    parser.add_argument("--name", help="the experiment's name, as search.run --name gave it")
    parser.add_argument(
        "--storage",
        help="where the experiment --name is, as search.run --storage gave it "
        f"(default: {DEFAULT_STORAGE})",
    )
    parser.add_argument("--top-k", type=COUNT, default=5, help="how many configs (default: 5)")
    parser.add_argument(
        "--arch",
        default="marsseg",
        help="only this architecture, or 'any' (default: marsseg, for the final MarsSeg stage)",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the configs and plots (default: results/<name>)"
    )
    parser.add_argument(
        "--no-plots", action="store_true", help=f"do not write the search's plots to <out>/{PLOTS}"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def location(args: argparse.Namespace) -> str:
    """The experiment's folder or URI: the positional one, or `--storage`/`--name` resolved as
    `search.run` resolves them (exactly one of the two forms)."""
    if args.experiment is not None and (args.name is not None or args.storage is not None):
        raise SearchError(
            f"give the experiment either as a folder ({args.experiment}) or as --name "
            "[--storage], not both"
        )
    if args.experiment is not None:
        return args.experiment
    if args.name is None:
        raise SearchError(
            "no experiment given: name it with --name NAME [--storage S], or give its folder"
        )
    storage = os.path.expanduser(args.storage or DEFAULT_STORAGE)  # as search.run's check does
    return f"{storage.rstrip('/')}/{check_name(args.name)}"


def read_results(experiment: Experiment) -> ResultGrid:
    """Tune's results of every trial of the experiment."""
    try:
        return ResultGrid(ExperimentAnalysis(experiment.uri))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SearchError(f"cannot read the experiment at {experiment.uri}: {err}") from None


def export(
    experiment: Experiment,
    top_k: int = 5,
    arch: str = "marsseg",
    out: Path | None = None,
    plots: bool = True,
) -> list[Path]:
    """Write the top-k configs of `arch` (or of any architecture), and the search's plots
    unless `plots` is False; return the configs' paths."""
    if arch != "any" and arch not in list_models():
        raise SearchError(
            f"--arch must be 'any' or one of {', '.join(list_models())}, got {arch!r}"
        )
    if top_k < 1:
        raise SearchError(f"--top-k must be >= 1, got {top_k}")
    out = check_writable(out or experiment.results)
    results = read_results(experiment)
    summaries = rank_trials(results, experiment.base)
    chosen = [s for s in summaries if arch == "any" or s.config.model.name == arch][:top_k]
    if not chosen:
        raise SearchError(f"no trial of architecture {arch!r} reported a score in {experiment.uri}")
    paths = []
    for rank, summary in enumerate(chosen, start=1):
        config = with_provenance(summary, experiment)
        paths.append(config.save(out / f"top-{rank:02d}-{summary.trial_id}.yaml"))
        if rank == 1:
            config.save(out / BEST_CONFIG)
    write_leaderboard(summaries, out / LEADERBOARD)
    timeline = experiment.driver / TIMELINE
    if timeline.is_file():
        shutil.copyfile(timeline, out / TIMELINE)
        print(summarise_timeline(read_timeline(timeline)).line())
    print(leaderboard(chosen)[SUMMARY_COLUMNS].to_string(index=False))
    print(f"\nwrote {len(paths)} configs, {out / BEST_CONFIG} and {out / LEADERBOARD}")
    if plots:
        drawn = write_experiment_plots(experiment, out / PLOTS, results)
        print(f"wrote {len(drawn)} plots to {out / PLOTS}", *(p.name for p in drawn))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        check_writable(args.out)  # before the experiment is even looked for
    experiment = Experiment.at(location(args))
    export(experiment, args.top_k, args.arch, args.out, plots=not args.no_plots)
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
