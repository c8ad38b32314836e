"""How fast each search strategy finds a configuration as good as the reference recipe.

    python -m benchmarks.search_efficiency                   # 90 s per search, seeds 0 1 2
    python -m benchmarks.search_efficiency --budget 600 --limit-images 2505 --max-epochs 12 \\
        --seeds 0 1 2 3 4

On the synthetic default archive, per seed: one run of the `reference` space (one trial, the same
max epochs) sets the target, the reference recipe's best val mIoU; then each strategy searches
`--space` for `--budget` seconds, the reference trial not enqueued: TPE + ASHA, TPE without
early stopping, and random search without early stopping. From each search's timeline (when
each epoch's result arrived, and its score) it prints one row per strategy: best val mIoU within
the budget (mean +- std over seeds), how many seeds matched the reference score and how soon
(mean over those), and both as ratios to random search. Any other flag goes to every search
(`--cpus-per-trial`, `--gpus-per-trial`, `--data`, ...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.record import markdown_table, write_results
from benchmarks.search_runs import device, run_search, search_storage
from marsseg.cli import run_cli
from marsseg.errors import ConfigError, SearchError
from search.timeline import trial_results

STRATEGIES = {
    "asha+tpe": ["--sampler", "tpe", "--scheduler", "asha"],
    "tpe": ["--sampler", "tpe", "--scheduler", "fifo"],
    "random": ["--sampler", "random", "--scheduler", "fifo"],
}
BASELINE = "random"
COLUMNS = {
    "strategy": "strategy",
    "best": "best val mIoU (mean ± std)",
    "reached": "reached reference",
    "time_to_reference_s": "time to reference s (mean)",
    "best_vs_random": "best / random",
    "speedup_vs_random": "speed-up vs random",
    "trials": "trials (mean)",
}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.search_efficiency", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--budget", type=float, default=90, help="seconds of search per strategy and seed")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--limit-images", type=int, default=256, help="cleaned training images")
    add("--max-epochs", type=int, default=4)
    add("--space", default="default", help="the space every strategy searches")
    add("--max-trials", type=int, default=1000, help="--num-samples (the budget ends a search)")
    add("--storage", type=Path, help="keep the experiments here (default: none)")
    args, search_flags = parser.parse_known_args(argv)
    if args.budget <= 0 or args.max_trials < 1:
        raise ConfigError("--budget must be > 0 and --max-trials >= 1")
    return args, search_flags


def main(argv: Sequence[str] | None = None) -> int:
    args, search_flags = parse_args(argv)
    size = ["--limit-images", str(args.limit_images), "--max-epochs", str(args.max_epochs)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in STRATEGIES}
    targets = {}
    with search_storage(args.storage) as storage:
        for seed in args.seeds:
            common = [*size, "--seed", str(seed), *search_flags]
            reference = ["--space", "reference", "--num-samples", "1", *common]
            targets[seed] = best_score(run_search(reference, storage, "reference"))
            for name, flags in STRATEGIES.items():
                search = [
                    *("--space", args.space, "--no-reference-trial", *flags, *common),
                    *("--time-budget", str(args.budget), "--num-samples", str(args.max_trials)),
                ]
                timeline = run_search(search, storage, name.replace("+", "-"))
                runs[name].append(score_run(timeline, targets[seed], args.budget))
    shown = ", ".join(f"seed {s}: {v:.4f}" for s, v in targets.items())
    print(f"\nreference recipe's val mIoU (the target): {shown}")
    rows = compare(runs)
    print("\n" + markdown_table(rows, COLUMNS))
    write_results(
        "search_efficiency",
        rows,
        device=device(),
        budget_s=args.budget,
        reference_val_miou=targets,
        runs=runs,
        search_flags=search_flags,
    )
    return 0


def best_score(timeline: list[dict[str, Any]]) -> float:
    """The best val mIoU a search reported (the reference run's is the target)."""
    scores = [score for _, _, score in trial_results(timeline)]
    if not scores:
        raise SearchError("the reference run reported no result; see its trial log")
    return max(scores)


def score_run(timeline: list[dict[str, Any]], target: float, budget: float) -> dict[str, Any]:
    """One search's best score within the budget, and when it first matched `target`."""
    results = [(t, trial, score) for t, trial, score in trial_results(timeline) if t <= budget]
    reached = next((t for t, _, score in results if score >= target), None)
    return {
        "best": max((score for _, _, score in results), default=None),
        "time_to_reference_s": reached,
        "trials": len({trial for _, trial, _ in results}),
    }


def compare(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per strategy, over seeds, with its ratios to the random-search baseline."""
    rows = []
    for name, seeds in runs.items():
        bests = [r["best"] for r in seeds if r["best"] is not None]
        times = [r["time_to_reference_s"] for r in seeds if r["time_to_reference_s"] is not None]
        rows.append(
            {
                "strategy": name,
                "best_mean": statistics.mean(bests) if bests else None,
                "best_std": statistics.stdev(bests) if len(bests) > 1 else None,
                "reached": f"{len(times)}/{len(seeds)}",
                "time_to_reference_s": statistics.mean(times) if times else None,
                "trials": statistics.mean(r["trials"] for r in seeds),
            }
        )
    baseline = next(r for r in rows if r["strategy"] == BASELINE)
    for row in rows:
        row["best"] = _mean_std(row["best_mean"], row["best_std"])
        row["best_vs_random"] = _ratio(row["best_mean"], baseline["best_mean"])
        row["speedup_vs_random"] = _ratio(
            baseline["time_to_reference_s"], row["time_to_reference_s"]
        )
    return rows


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


if __name__ == "__main__":
    sys.exit(run_cli(main))
