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
Re-running with the same `--name` (or `--resume`) continues an interrupted experiment with its
saved settings, base config and data. One driver runs an experiment at a time (`search.lock`);
a search whose trials all fail, or more than `MAX_ERRORED_SHARE` of them, exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune import ResultGrid

from marsseg.cli import (
    COUNT,
    CPUS,
    FOLDS,
    GPUS,
    SEED,
    ArgumentParser,
    command,
    number_flag,
    program,
)
from marsseg.config import TrainConfig, preset
from marsseg.data import MarsArchive, load_clean_archive, train_val_split
from marsseg.data.synthetic import default_archive_path
from marsseg.errors import ConfigError, SearchError
from marsseg.fileio import check_writable
from marsseg.models import list_models
from marsseg.predict import check_target
from marsseg.yamlfile import read_yaml_mapping
from search.capacity import concurrent_trials, start_ray
from search.experiment import (
    BEST_CONFIG,
    DEFAULT_STORAGE,
    LEADERBOARD,
    LOCK_FILE,
    SAMPLERS,
    SCHEDULERS,
    STUDY_FILE,
    TIMELINE,
    Experiment,
    SearchSettings,
    check_name,
    driver_folder,
    results_folder,
)
from search.export import export
from search.final import FinalSettings, train_final
from search.final import parse_args as final_args
from search.lock import DriverLock
from search.packing import check_gpu_packing
from search.results import (
    OBJECTIVE,
    TrialError,
    TrialSummary,
    rank_trials,
    trial_errors,
    with_provenance,
    write_leaderboard,
)
from search.storage import Storage, check_shared_storage, check_storage, parse_storage
from search.timeline import read_timeline, summarise_timeline
from search.tuner import TrialResources, TrialStarts, close_study, new_tuner, restore_tuner
from spaces import SPACE_NAMES, SearchSpace, get_space, params_to_config

SYNTHETIC_IMAGES = 256
"""Images the no-flag run trains on (of the synthetic default's 2505), so it takes minutes."""
MAX_ERRORED_SHARE = 0.5
"""A search in which more than this share of the trials errored (after their retries) exits
non-zero, as does one in which no trial reported a result."""
SHOWN_COLUMNS = ["rank", "trial", "arch", "loss", "augment", "oversample", "epochs", OBJECTIVE]
RUN_DEFAULTS: dict[str, Any] = {
    "settings": None,
    "train_config": None,
    "cpus_per_trial": None,
    "gpus_per_trial": None,
    "address": None,
    "storage": DEFAULT_STORAGE,
    "name": None,
    "resume": False,
    "break_lock": False,
    "checkpoint_every": 1,
    "final": False,
    "final_arch": "marsseg",
    "final_folds": None,
    "final_max_epochs": None,
    "force": False,
}
"""Defaults of the flags that are this run's choice; the search's own are `SearchSettings`'."""
DEFAULTS = {**dataclasses.asdict(SearchSettings()), **RUN_DEFAULTS}
OLD_SPELLINGS = {"--config": "--settings", "--final-epochs": "--final-max-epochs"}
"""Flags renamed so that one name means one thing in every entry point (`--config` is a
training config everywhere else); the old spellings keep working, on the command line and as
keys of a `--settings` file."""


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    """The flags; a flag not given is absent from the namespace (see `parse_args`)."""
    parser = ArgumentParser(
        prog=program("search.run", "marsseg-search"),
        description=__doc__.splitlines()[0],
        argument_default=argparse.SUPPRESS,
        exit_on_error=exit_on_error,
    )
    _data_flags(parser)
    _search_flags(parser)
    _resource_flags(parser)
    _final_flags(parser)
    return parser


def _flag(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: Any) -> None:
    """Add `flag` (and its old spellings), naming its default (from `DEFAULTS`) in the help
    when it has one."""
    dest = _dest(flag)
    default = DEFAULTS[dest]
    shown = "" if default in (None, False) else f" (default: {default})"
    old = [alias for alias, new in OLD_SPELLINGS.items() if new == flag]
    parser.add_argument(flag, *old, dest=dest, help=help + shown, **kwargs)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--settings", "YAML file with any of these flags as keys (flags win)")
    _flag(parser, "--data", "archive .npz (default: the synthetic one)")
    _flag(
        parser,
        "--limit-images",
        f"train on the first N cleaned images (default: all; {SYNTHETIC_IMAGES} on the "
        "synthetic default)",
        type=COUNT,
    )
    _flag(parser, "--train-config", "base training config for what the space leaves fixed")


def _search_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--space", f"search space: {', '.join(SPACE_NAMES)}")
    _flag(parser, "--num-samples", "trials to run", type=COUNT)
    _flag(parser, "--max-epochs", "epochs of a trial that is never stopped", type=COUNT)
    _flag(parser, "--grace-period", "ASHA: epochs before a trial can be stopped", type=COUNT)
    _flag(
        parser,
        "--reduction-factor",
        "ASHA: keep 1/N at each rung",
        type=number_flag(1, low_open=True),
    )
    _flag(
        parser, "--max-concurrent", "trials at once (default: what the cluster holds)", type=COUNT
    )
    _flag(parser, "--seed", "seed of the sampler and of every trial's training", type=SEED)
    _flag(
        parser,
        "--time-budget",
        "stop the whole search after this many seconds (a resume runs for what is left)",
        type=number_flag(0, low_open=True),
    )
    _flag(parser, "--sampler", f"Optuna sampler of the trials: {', '.join(SAMPLERS)}")
    _flag(parser, "--scheduler", f"{', '.join(SCHEDULERS)} (fifo: no early stopping)")
    _flag(
        parser,
        "--no-reference-trial",
        "do not run the space's starting point first (the reference recipe; in the budget "
        "spaces, plain's)",
        action="store_true",
    )
    _flag(
        parser,
        "--no-reuse-actors",
        "start a fresh Ray actor for every trial instead of reusing a finished one's",
        action="store_true",
    )
    _flag(parser, "--name", "experiment name (default: <space>-<time>); reuse it to resume")
    _flag(parser, "--resume", "continue the experiment --name (must exist)", action="store_true")
    _flag(
        parser,
        "--break-lock",
        "take over the experiment's lock from a driver on another host that is gone",
        action="store_true",
    )


def _resource_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--gpus-per-trial", "GPUs per trial; 0.25 packs 4 (default: 1 if any)", type=GPUS)
    _flag(parser, "--cpus-per-trial", "CPUs per trial, its torch threads (default: 1)", type=CPUS)
    _flag(parser, "--address", "Ray address: 'auto' joins a cluster from `ray up` (default: local)")
    _flag(
        parser,
        "--storage",
        "experiments folder; on a cluster s3://bucket/prefix, or file:///path for a folder "
        "every node mounts",
    )
    _flag(
        parser,
        "--checkpoint-every",
        "checkpoint every N epochs and the last; a retried trial redoes up to N-1 epochs",
        type=COUNT,
    )


def _final_flags(parser: argparse.ArgumentParser) -> None:
    _flag(
        parser, "--final", "then export the best config and run search.final", action="store_true"
    )
    _flag(parser, "--final-arch", "architecture --final retrains, or 'any'")
    _flag(
        parser, "--final-folds", "--final trains a k-fold ensemble (see search.final)", type=FOLDS
    )
    _flag(
        parser,
        "--final-max-epochs",
        "--final's epochs (default: derived from the search)",
        type=COUNT,
    )
    _flag(parser, "--force", "let --final overwrite an existing submission", action="store_true")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Every flag's value, and those the user set (on the command line or in `--settings`)."""
    given = vars(build_parser().parse_args(argv))
    if given.get("settings") is not None:
        given = {**_settings_file_values(given["settings"]), **given}
    return argparse.Namespace(**{**DEFAULTS, **given}), given


def _settings_file_values(path: str) -> dict[str, Any]:
    """The flags a `--settings` YAML file sets, parsed as if given on the command line."""
    if Path(path).is_dir():
        raise ConfigError(f"--settings {path} is a folder, not a settings file")
    try:
        values = read_yaml_mapping(path, "flag names to values", empty_ok=True)
    except OSError:
        raise ConfigError(f"settings file not found: {path}") from None
    argv = []
    for key, value in values.items():
        flag = f"--{str(key).replace('_', '-')}"
        flag = OLD_SPELLINGS.get(flag, flag)
        dest = _dest(flag)
        if dest not in DEFAULTS or dest == "settings":
            if "model" in values:  # a TrainConfig, not flags: say where it goes
                raise ConfigError(f"{path} is a training config: pass it as --train-config")
            known = ", ".join(sorted(set(DEFAULTS) - {"settings"}))
            raise ConfigError(f"{path}: unknown key {key!r} (known: {known})")
        if isinstance(DEFAULTS[dest], bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif isinstance(value, (list, dict)):
            raise ConfigError(f"{path}: {key} must be a single value, got {value!r}")
        elif value is not None:
            argv += [flag, str(value)]
    try:
        return vars(build_parser(exit_on_error=False).parse_args(argv))
    except argparse.ArgumentError as err:
        raise ConfigError(f"{path}: {err}") from None


def settings_from(args: argparse.Namespace) -> SearchSettings:
    """The search's settings from the flags (one line for a bad value)."""
    values = {name: getattr(args, name) for name in SearchSettings.__dataclass_fields__}
    if values["data"] is not None:
        values["data"] = str(Path(values["data"]).expanduser().resolve())
    return SearchSettings(**values)


def load_data(data: str | None, limit: int | None) -> tuple[MarsArchive, dict[str, Any]]:
    """The cleaned archive the trials train on, and its provenance: where it came from, the
    checksum of the whole cleaned archive (what a resume or a final training is checked
    against) and, when the trials see only the first N images, N."""
    source = str(data) if data else f"synthetic ({default_archive_path()})"
    archive, report = load_clean_archive(data)
    print(f"data: {source}: {report.summary()}")
    provenance: dict[str, Any] = {"data": source, "data_checksum": archive.checksum()}
    if limit is not None and limit > len(archive):
        raise ConfigError(
            f"--limit-images {limit}: the cleaned archive holds only {len(archive)} images"
        )
    limit = limit or (None if data else SYNTHETIC_IMAGES)
    if limit is not None and limit < len(archive):
        archive = archive.subset(np.arange(limit))
        provenance["data_images"] = limit
        print(f"data: training on the first {limit} cleaned images")
    return archive, provenance


def base_config(args: argparse.Namespace, settings: SearchSettings) -> TrainConfig:
    """What the space does not sample: the base config, with the search's epochs and seed."""
    base = TrainConfig.load(args.train_config) if args.train_config else preset("reference")
    return base.replace(max_epochs=settings.max_epochs, seed=settings.seed)


@dataclass(frozen=True)
class NewSearch:
    """What a new search trains on, checked before its experiment exists."""

    base: TrainConfig
    archive: MarsArchive
    provenance: dict[str, Any]


def prepare_new(
    args: argparse.Namespace, settings: SearchSettings, space: SearchSpace
) -> NewSearch:
    """Load and check everything a new search's trials will need, so that a mistake is one line
    now instead of every trial failing on it later: the base config, the data (and
    `--limit-images` within it), a split with images on both sides, and a config the space
    proposes that builds its model."""
    base = base_config(args, settings)
    if base.val_fraction == 0:
        raise ConfigError(
            f"--train-config {args.train_config}: val_fraction is 0, and a search ranks its "
            "trials on a validation split"
        )
    archive, provenance = load_data(args.data or settings.data, settings.limit_images)
    try:
        train_val_split(archive.masks, base.val_fraction, base.seed)
    except ConfigError as err:
        raise ConfigError(f"the search's base config: {err}") from None
    # A throwaway study: its "A new study created in memory" line would precede any refusal.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.seed))
    finally:
        optuna.logging.set_verbosity(verbosity)
    trial = study.ask()
    constants = space.space(trial) or {}
    try:
        params_to_config({**trial.params, **constants}, base).model.build()
    except ConfigError as err:
        raise ConfigError(f"space {settings.space} on the base config: {err}") from None
    return NewSearch(base, archive, provenance)


def resume_if_asked(
    args: argparse.Namespace, given: dict[str, Any], storage: Storage
) -> Experiment | None:
    """The experiment `--name` continues, if it exists; its saved settings win over the flags,
    and the flags they override are named."""
    uri = storage.experiment(args.name) if args.name else None
    if uri is None or not tune.Tuner.can_restore(uri):
        if args.resume:
            raise SearchError(f"--resume: no experiment to continue at {uri}")
        return None
    experiment = Experiment.resume(storage, args.name)
    print(f"resuming experiment {experiment.uri} with its saved settings and base config")
    ignored = experiment.settings.differences(given)
    if "train_config" in given:
        ignored.append(f"--train-config {given['train_config']} (kept: its base config)")
    if ignored:
        print(
            f"resume: ignoring {', '.join(ignored)}; to search with them, give a new --name "
            f"(or delete {experiment.uri} to start this one over)"
        )
    return experiment


def plan_resources(
    args: argparse.Namespace,
    storage: Storage,
    settings: SearchSettings,
    base: TrainConfig,
    images: int,
) -> tuple[TrialResources, int]:
    """Each trial's resources on the cluster joined, and how many trials run at once; refuses
    what cannot run (a trial bigger than any node, a packing that does not fit)."""
    started = start_ray(args.address, args.cpus_per_trial, args.gpus_per_trial)
    resources = TrialResources(started.cpus, started.gpus, args.checkpoint_every)
    cap, gpus = started.capacity, started.gpus
    check_shared_storage(storage, cap)
    # Trials sharing a GPU: measure the heaviest on one and refuse a packing that cannot fit.
    check_gpu_packing(base, images, gpus)
    concurrent = settings.max_concurrent or concurrent_trials(cap, resources.cpus, gpus)
    print(
        f"ray: {cap.describe()}; trials use {resources.cpus:g} CPU + {gpus:g} GPU, "
        f"{concurrent} at a time"
    )
    return resources, concurrent


def main(argv: Sequence[str] | None = None) -> int:
    args, given = parse_args(argv)
    # Everything that can be refused from the flags alone is, before anything is created.
    settings = settings_from(args)  # checks the flags, also where a resume then ignores them
    space = get_space(settings.space)
    if args.resume and args.name is None:
        raise ConfigError("--resume needs --name of the experiment to continue")
    name = check_name(args.name) if args.name is not None else default_name(settings.space)
    if args.final:
        check_architecture(args.final_arch, "--final-arch")
        check_final_outputs(final_settings(args, name))
    # A new search's inputs are checked before its experiment (or the storage) is made.
    storage = parse_storage(args.storage)
    new = None
    if not (args.resume or tune.Tuner.can_restore(storage.experiment(name))):
        new = prepare_new(args, settings, space)
    storage = check_storage(args.storage)
    # Held until the search (and --final) ends: a second driver on `name` is refused.
    with DriverLock(driver_folder(storage, name) / LOCK_FILE, name, args.break_lock):
        sigint = signal.getsignal(signal.SIGINT)
        experiment, results = run_search(args, given, settings, storage, name, new)
        interrupted = tune_was_interrupted(sigint)
        signal.signal(signal.SIGINT, sigint)  # Ctrl-C during --final stops it, as it should
        if not interrupted:  # An interrupted search's open trials are the ones a resume runs.
            say_closed(close_study(experiment))
        report(results, experiment)
        if interrupted:
            raise_interrupted(results, experiment)
        if args.final:
            run_final(args, experiment)
    return 0


def run_search(
    args: argparse.Namespace,
    given: dict[str, Any],
    settings: SearchSettings,
    storage: Storage,
    name: str,
    new: NewSearch | None = None,
) -> tuple[Experiment, ResultGrid]:
    """Resume the experiment `name` or start it (from `new`, its checked inputs), and run its
    trials to the end."""
    resumed = resume_if_asked(args, given, storage)
    settings = resumed.settings if resumed else settings
    space = get_space(settings.space)
    if resumed:
        base = resumed.base
        archive, provenance = load_data(args.data or settings.data, settings.limit_images)
        resumed.check_data(provenance["data_checksum"], provenance["data"])
    else:
        new = new or prepare_new(args, settings, space)
        base, archive, provenance = new.base, new.archive, new.provenance
    resources, concurrent = plan_resources(args, storage, settings, base, len(archive))
    if resumed:
        return resumed, restore_tuner(resumed, archive, resources).fit()
    settings = dataclasses.replace(settings, max_concurrent=concurrent)
    base = base.replace(provenance={**provenance, "space": settings.space})
    experiment = Experiment.new(storage, name, base, settings)
    return experiment, fit_new(experiment, space, archive, resources)


def default_name(space: str) -> str:
    """`<space>-<time>`, with a custom space's `module:function` made a folder name."""
    return f"{space.replace(':', '-').replace('.', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_architecture(arch: str, flag: str) -> str:
    """`arch` if the registry knows it (or it is 'any'): refused now, not after the search."""
    if arch != "any" and arch not in list_models():
        known = ", ".join(list_models())
        raise ConfigError(f"{flag} {arch!r}: unknown architecture; known: {known}, or 'any'")
    return arch


def fit_new(
    experiment: Experiment, space: SearchSpace, archive: MarsArchive, resources: TrialResources
) -> ResultGrid:
    """Run a new search; if it fails (or ends) before its first trial started, remove the
    experiment, so that a rerun with its name starts it afresh instead of resuming nothing."""
    starts = TrialStarts()
    try:
        results = new_tuner(experiment, space, archive, resources, callbacks=[starts]).fit()
    except BaseException:
        if not starts.count:
            experiment.discard()
            print(f"search: failed before its first trial; removed experiment {experiment.uri}")
        raise
    if not starts.count:
        experiment.discard()
        raise SearchError(
            f"no trial of experiment {experiment.name} started; removed it (a rerun with "
            "--name starts it afresh)"
        )
    return results


FINAL_FLAGS = {
    "final_folds": "--folds",
    "final_max_epochs": "--max-epochs",
    "cpus_per_trial": "--cpus-per-trial",
    "gpus_per_trial": "--gpus-per-trial",
    "address": "--address",
}
"""The flags `--final` hands on to `search.final`, by the name this run gives them."""


def final_settings(args: argparse.Namespace, name: str) -> FinalSettings:
    """How `--final` trains and where it writes (checked before the search starts): what
    `search.final` makes of the flags handed on to it (`FINAL_FLAGS`, `--force`), so the two
    read them alike; the config and output folder are the experiment's. The folds get a
    trial's CPUs and GPUs; this process keeps torch's own threads unless `--cpus-per-trial` was
    given."""
    out = results_folder(name)
    argv = [f"--config={out / BEST_CONFIG}", f"--out={out / 'final'}"]
    for dest, flag in FINAL_FLAGS.items():
        if getattr(args, dest) is not None:
            argv.append(f"{flag}={getattr(args, dest)}")
    argv += ["--force"] if args.force else []
    command = f"python -m search.run {shlex.join(sys.argv[1:])}"
    return FinalSettings.from_args(final_args(argv), command)


def check_final_outputs(settings: FinalSettings) -> None:
    """Refuse `--final`'s outputs now rather than after hours of search: an existing submission
    (without `--force`) or a folder that cannot be written."""
    check_target(settings.submission_path, settings.force)
    check_writable(settings.out)


def run_final(args: argparse.Namespace, experiment: Experiment) -> None:
    """search -> export -> final in one go: the best config of `--final-arch`, retrained on
    the whole cleaned archive (not `--limit-images`' share), its folds as Ray tasks on the
    search's own Ray with a trial's resources each."""
    settings = final_settings(args, experiment.name)
    export(experiment, top_k=5, arch=args.final_arch, out=experiment.results)
    archive, _ = load_clean_archive(args.data or experiment.settings.data)
    train_final(TrainConfig.load(settings.config_path), archive, settings)


def report(results: ResultGrid, experiment: Experiment) -> None:
    """Print the leaderboard, the errored trials, what to do next and the timeline's summary;
    write leaderboard.csv and best_config.yaml beside the study, and upload the driver's files.
    Then fail (one line) if no trial reported a result or too many errored."""
    folder = experiment.driver
    summaries = rank_trials(results, experiment.base)
    errors = trial_errors(results)
    if summaries:
        table = write_leaderboard(summaries, folder / LEADERBOARD)
        shown = SHOWN_COLUMNS + [c for c in table if c.startswith("val_iou")]
        print("\n" + table[shown].to_string(index=False))
        with_provenance(summaries[0], experiment).save(folder / BEST_CONFIG)
        print(
            f"\nwrote {folder / LEADERBOARD} and {folder / BEST_CONFIG} ({summaries[0].trial_id})"
        )
        print(f"watch it: tensorboard --logdir {shlex.quote(experiment.uri)}")
        print(f"          optuna-dashboard {shlex.quote(f'sqlite:///{folder / STUDY_FILE}')}")
        print_next_steps(experiment, summaries)
    else:
        print(f"no trial reported a result; see the trial logs under {experiment.uri}")
    for error in errors:
        print(f"errored: trial {error.trial_id}: {error.message}")
    if (folder / TIMELINE).is_file():
        print(summarise_timeline(read_timeline(folder / TIMELINE)).line())
    experiment.sync()
    check_outcome(experiment, len(results), summaries, errors)


def experiment_args(experiment: Experiment) -> list[str]:
    """The flags that name `experiment` to the other commands: its name, and its storage where
    that is not the default."""
    named = ["--name", experiment.name]
    default = Storage(str(Path(DEFAULT_STORAGE).absolute()), shared=False)
    if experiment.storage != default:
        named += ["--storage", experiment.storage.flag]
    return named


def tune_was_interrupted(sigint_before_fit: Any) -> bool:
    """Whether Tune's `fit` ended on Ctrl-C (or SIGUSR1).

    Tune answers the first one by saving its state and returning as if the search had ended,
    and nothing it returns says so. Its handler (`ray.tune.tune._setup_signal_catching`) puts
    back the one it replaced when it fires; a fit that ends on its own leaves it installed.
    """
    if os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") != "0":
        return False  # Tune left Ctrl-C alone: it raised KeyboardInterrupt, if it came
    return signal.getsignal(signal.SIGINT) is sigint_before_fit


def say_closed(numbers: list[int]) -> None:
    """One line for the trials the search's end stopped (the time budget), if any."""
    if numbers:
        listed = ", ".join(map(str, numbers))
        print(
            f"search: the time budget ended Optuna trials {listed} early; the study records "
            "them as pruned (failed if they reported no epoch)"
        )


def raise_interrupted(results: ResultGrid, experiment: Experiment) -> None:
    """Exit 130 with one line saying how to continue: a script running the search (a
    campaign's next stage, a scheduler) must not take an interrupted search for a finished one."""
    resume = shlex.join(["python", "-m", "search.run", *experiment_args(experiment)])
    raise KeyboardInterrupt(
        f"interrupted after {len(results)} trials started; continue with: {resume} --resume"
    )


def print_next_steps(experiment: Experiment, summaries: list[TrialSummary]) -> None:
    """The commands that take the search's pick on: export it, train it for real."""
    export_args = experiment_args(experiment)
    if not any(s.config.model.name == "marsseg" for s in summaries):
        export_args += ["--arch", "any"]
    final_args = ["--config", str(experiment.results / BEST_CONFIG)]
    if experiment.settings.data:
        final_args += ["--data", experiment.settings.data]
    # Quoted for a shell, so a path with spaces or other special characters pastes as it is.
    print(f"next:     python -m search.export {shlex.join(export_args)}")
    print(f"          python -m search.final {shlex.join(final_args)}")


def check_outcome(
    experiment: Experiment, trials: int, summaries: list[TrialSummary], errors: list[TrialError]
) -> None:
    """Refuse, in one line naming the errored trials, a search no trial of which reported a
    result or more than `MAX_ERRORED_SHARE` of whose trials errored."""
    named = (
        f"{', '.join(e.trial_id for e in errors)} (first: {errors[0].message})" if errors else ""
    )
    if not summaries:
        # Nothing to resume: keeping it would make a corrected rerun continue the same failure.
        experiment.discard()
        errored = f"; {len(errors)} errored: {named}" if errors else ""
        raise SearchError(
            f"no trial of experiment {experiment.name} reported a result{errored}; removed the "
            "experiment, so a rerun with its --name starts afresh"
        )
    if len(errors) > MAX_ERRORED_SHARE * trials:
        raise SearchError(
            f"{len(errors)} of {trials} trials of experiment {experiment.name} errored, more "
            f"than {MAX_ERRORED_SHARE:.0%}: {named}"
        )


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
