"""Ray's share of a search's device time, as the search's own timeline records it.

    python -m benchmarks.ray_overhead                                  # a default search
    python -m benchmarks.ray_overhead --settings default no-reuse checkpoint-every-epoch
    python -m benchmarks.ray_overhead --num-samples 16 --max-epochs 8 --limit-images 1024

Runs `search.run` once per setting (a setting turns one lever off or on; `default` is what
`search.run` does with no flags) on a local Ray and the synthetic default archive; any other
flag (`--num-samples`, `--max-epochs`, `--limit-images`, `--time-budget`, `--space`,
`--gpus-per-trial`, ...) is passed on to every search. Prints one row per search: trial start
latency (Tune start -> first result, less that epoch), per-epoch report + checkpoint overhead
(gap between results, less the epoch) with the part the trial itself spent writing its
checkpoint and panel, and the share of the device-slot time (slots x wall time) in which no
trial was training, split into starts, reports and slots with no trial at all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.record import markdown_table, write_results
from benchmarks.search_runs import device, run_search, search_storage
from marsseg.cli import run_cli
from marsseg.errors import ConfigError
from search.timeline import summarise_timeline

SETTINGS = {
    "default": [],
    "no-reuse": ["--no-reuse-actors"],
    "checkpoint-every-epoch": ["--checkpoint-every", "1"],
    "checkpoint-every-4": ["--checkpoint-every", "4"],
}
"""Named sets of `search.run` flags, each one lever away from the defaults."""
COLUMNS = {
    "setting": "setting",
    "trials": "trials",
    "epochs": "epochs",
    "slots": "slots",
    "wall_s": "wall s",
    "start_median_s": "start s (median)",
    "start_max_s": "start s (max)",
    "setup_median_s": "of which trial setup s",
    "report_median_s": "report s/epoch (median)",
    "report_prep_median_s": "of which checkpoint+panel s",
    "idle_pct": "slots idle %",
    "start_pct": "idle: starts %",
    "report_pct": "idle: reports %",
    "between_pct": "idle: no trial %",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ray_overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--settings", nargs="+", default=["default"], help=", ".join(SETTINGS))
    parser.add_argument("--storage", type=Path, help="keep the experiments here (default: none)")
    args, search_flags = parser.parse_known_args(argv)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")

    rows = []
    with search_storage(args.storage) as storage:
        for setting in args.settings:
            timeline = run_search([*search_flags, *SETTINGS[setting]], storage, setting)
            rows.append({"setting": setting, **summarise_timeline(timeline).row()})
    print("\n" + markdown_table(rows, COLUMNS))
    write_results("ray_overhead", rows, device=device(), search_flags=search_flags)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
