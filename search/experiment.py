"""An experiment: one search's name, storage, settings, base config and data, as one object.

Every stage that touches an experiment (`search.run` new or resumed, `search.export`, the
benchmarks) builds an `Experiment` instead of re-deriving paths from a string. It owns:
- where Tune keeps the trials (`uri`: a folder or an object store URI);
- the driver folder (`driver`): the files only the driver writes — the Optuna study, the base
  config, the settings, the leaderboard, the timeline and ASHA's rungs. For a plain local
  storage it is the experiment folder itself. For storage that other machines reach (`s3://`,
  or `file://` for a mount every node shares) it is `experiments/<name>` under the driver's
  working directory, kept as a relative path (so a resumed search on another head resolves it
  there), and its files are uploaded to the experiment's storage as they change: SQLite does
  not run on S3 and is unreliable on NFS, but a copy there lets `--resume` start on a new head;
- the search's settings and base config, saved at start and read back on resume, so a resumed
  search runs the search it continues whatever this run's flags say;
- the checksum of the data the search was started on, so a resume on other data is refused.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from marsseg.checks import check_number
from marsseg.config import TrainConfig
from marsseg.errors import ConfigError, SearchError
from marsseg.fileio import atomic_path
from marsseg.yamlfile import read_yaml_mapping
from search.asha import ASHA_STATE
from search.storage import Storage, delete_folder, download_files, folder_entries, upload_files

BASE_CONFIG = "base_config.yaml"
"""What the space does not sample, with the data's provenance; saved at start."""
SETTINGS = "search.yaml"
"""The search's `SearchSettings`; saved at start."""
STUDY_FILE = "optuna.db"
LEADERBOARD = "leaderboard.csv"
BEST_CONFIG = "best_config.yaml"
TIMELINE = "timeline.csv"
DRIVER_FILES = (BASE_CONFIG, SETTINGS, STUDY_FILE, LEADERBOARD, BEST_CONFIG, TIMELINE, ASHA_STATE)
"""What the driver writes beside the trials, and uploads when the storage is shared."""
LOCK_FILE = "driver.lock"
"""Held by the driver running the experiment (see `search.lock`); never uploaded."""
DEFAULT_STORAGE = "experiments"
"""Where experiments go without `--storage`: a folder under the working directory."""
SAMPLERS = ("tpe", "random")
"""Optuna samplers: random is the baseline `benchmarks.search_efficiency` compares TPE with."""
SCHEDULERS = ("asha", "fifo")
"""Trial schedulers: ASHA stops poor trials early, fifo runs every trial to its end."""


@dataclass(frozen=True)
class SearchSettings:
    """What a search is: fixed when it starts, saved with it, and what a resume continues.

    The field names are `search.run`'s flag names, and the defaults are its defaults.
    """

    space: str = "default"
    data: str | None = None
    """The archive's absolute path (None: the synthetic default). A resume reads the data from
    here unless `--data` names it elsewhere (a new head); its checksum must match either way."""
    limit_images: int | None = None
    """Train on the first N cleaned images (None: all)."""
    num_samples: int = 8
    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: float = 2
    max_concurrent: int | None = None
    """Trials at once (None until the search starts: what the cluster holds)."""
    seed: int = 0
    time_budget: float | None = None
    sampler: str = "tpe"
    scheduler: str = "asha"
    no_reference_trial: bool = False
    no_reuse_actors: bool = False

    def __post_init__(self) -> None:
        """The flags' own rules (`marsseg.cli`), for settings built in code or read back."""
        rules: dict[str, dict[str, Any]] = {
            "limit_images": {"integer": True, "low": 1},
            "num_samples": {"integer": True, "low": 1},
            "max_epochs": {"integer": True, "low": 1},
            "grace_period": {"integer": True, "low": 1},
            "reduction_factor": {"low": 1, "low_open": True},
            "max_concurrent": {"integer": True, "low": 1},
            "seed": {"integer": True, "low": 0},
            "time_budget": {"low": 0, "low_open": True},
        }
        for name, rule in rules.items():
            value = getattr(self, name)
            if value is not None:
                check_number(value, f"--{name.replace('_', '-')}", **rule)
        for flag, known in (("sampler", SAMPLERS), ("scheduler", SCHEDULERS)):
            if getattr(self, flag) not in known:
                raise ConfigError(f"--{flag} must be one of {', '.join(known)}")
        if self.scheduler == "asha" and self.grace_period > self.max_epochs:
            raise ConfigError(
                f"--grace-period {self.grace_period} is more than --max-epochs "
                f"{self.max_epochs}: ASHA would never stop a trial; give at most the max epochs"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> SearchSettings:
        """Settings from flag values; unknown names and wrong types are one line naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        checked = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{where}: unknown setting {key!r}")
            checked[key] = _typed(value, hints[key], f"{where}: {key}")
        return cls(**checked)

    def save(self, path: Path) -> None:
        with atomic_path(path) as temp:
            temp.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> SearchSettings:
        return cls.from_mapping(read_yaml_mapping(path, "settings"), str(path))

    def differences(self, requested: Mapping[str, Any]) -> list[str]:
        """`--flag value (kept: saved)` for each requested setting that differs from these."""
        return [
            f"--{key.replace('_', '-')} {value} (kept: {getattr(self, key)})"
            for key, value in requested.items()
            if key in self.__dataclass_fields__ and key != "data" and getattr(self, key) != value
        ]


def _typed(value: Any, hint: Any, what: str) -> Any:
    """`value` checked against a field's type (int, float, str, bool, or one of them | None)."""
    options = typing.get_args(hint) or (hint,)
    if value is None and type(None) in options:
        return None
    kind = next(t for t in options if t is not type(None))
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{what} must be {kind.__name__}, got {value!r}")


NAME_BYTES = 200
"""The longest experiment name, in UTF-8 bytes: a folder name, with room for Tune's suffixes."""


def check_name(name: str, flag: str = "--name") -> str:
    """`name` if it is one folder name, as an experiment's must be: it names a folder in the
    storage and in `results/`, and a failed start removes what it made there."""
    if (
        not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
        or name.startswith("-")
        or name != name.strip()
        or not name.isprintable()
    ):
        raise ConfigError(
            f"{flag} {name!r} is not a folder name: give one name, without '/', control "
            "characters or surrounding spaces, not '.' or '..', not starting with '-' "
            "(e.g. marsseg-1)"
        )
    if len(name.encode()) > NAME_BYTES:
        raise ConfigError(
            f"{flag} is {len(name.encode())} bytes long; a name has at most {NAME_BYTES} "
            "(filesystems cap a folder name at 255)"
        )
    return name


def results_folder(name: str) -> Path:
    """Where the exports and the final training of experiment `name` go by default."""
    return Path("results") / name


@dataclass(frozen=True)
class Experiment:
    """One search: where it lives, what it searches and on which data (see the module doc)."""

    name: str
    storage: Storage
    base: TrainConfig
    settings: SearchSettings
    found: frozenset[str] = field(default=frozenset(), compare=False)
    """What the experiment folder held before this run started it: `discard` leaves it be."""

    @property
    def uri(self) -> str:
        """The experiment's folder or URI, as Tune writes and restores it."""
        return self.storage.experiment(self.name)

    @property
    def driver(self) -> Path:
        """The driver's files: the experiment folder, or `experiments/<name>` under the working
        directory when the storage is shared (relative on purpose; see the module doc)."""
        return driver_folder(self.storage, self.name)

    @property
    def study_url(self) -> str:
        """The Optuna storage URL of the study (relative with a relative driver folder)."""
        return f"sqlite:///{self.driver / STUDY_FILE}"

    @property
    def data_checksum(self) -> str:
        """The checksum of the cleaned archive the search started on ("" if unrecorded)."""
        return str(self.base.provenance.get("data_checksum", ""))

    @property
    def results(self) -> Path:
        """Where `search.export` and `search.run --final` write by default."""
        return results_folder(self.name)

    @classmethod
    def new(
        cls, storage: Storage, name: str, base: TrainConfig, settings: SearchSettings
    ) -> Experiment:
        """Start an experiment: save its base config and settings (and upload them).

        Driver files already there are what a start that never ran a trial left (Tune had
        nothing to resume): they are removed, with one line saying so, so that the new search
        does not continue that start's study or rungs."""
        found = folder_entries(storage.experiment(name)) - {LOCK_FILE}
        experiment = cls(name, storage, base, settings, found)
        experiment.driver.mkdir(parents=True, exist_ok=True)
        left = [f for f in DRIVER_FILES if (experiment.driver / f).is_file()]
        for file in left:
            (experiment.driver / file).unlink()
        if left:
            print(
                f"experiment {name}: starting afresh; removed {', '.join(left)} left by an "
                "earlier start that ran no trial"
            )
        base.save(experiment.driver / BASE_CONFIG)
        settings.save(experiment.driver / SETTINGS)
        experiment.sync()
        return experiment

    @classmethod
    def resume(cls, storage: Storage, name: str) -> Experiment:
        """An experiment as it was saved, its driver files fetched from storage when missing."""
        experiment = cls.open(storage, name)  # reads the saved settings when there are some
        if not (experiment.driver / SETTINGS).is_file():
            raise SearchError(
                f"cannot resume {experiment.uri}: it has no {SETTINGS} (started by an older "
                "version of search.run); start a new experiment"
            )
        return experiment

    @classmethod
    def open(cls, storage: Storage, name: str) -> Experiment:
        """An existing experiment, for reading (settings are the defaults if none were saved)."""
        probe = cls(name, storage, TrainConfig(), SearchSettings())
        if storage.shared and not (probe.driver / BASE_CONFIG).is_file():
            download_files(probe.uri, DRIVER_FILES, probe.driver)
        if not (probe.driver / BASE_CONFIG).is_file():
            raise SearchError(f"no search experiment at {probe.uri} (missing {BASE_CONFIG})")
        settings_file = probe.driver / SETTINGS
        settings = SearchSettings.load(settings_file) if settings_file.is_file() else None
        base = TrainConfig.load(probe.driver / BASE_CONFIG)
        return cls(name, storage, base, settings or SearchSettings())

    @classmethod
    def at(cls, location: str) -> Experiment:
        """The experiment at a folder or URI, as `search.export` is given it."""
        parent, _, name = location.rstrip("/").rpartition("/")
        if not name:
            raise SearchError(f"{location!r} does not name an experiment folder")
        if urlparse(location).scheme == "file":
            return cls.open(Storage(unquote(urlparse(parent).path) or "/", shared=True), name)
        if "://" in location:
            return cls.open(Storage(parent, shared=True), name)
        return cls.open(Storage(str(Path(parent or ".").resolve()), shared=False), name)

    def check_data(self, checksum: str, source: str) -> None:
        """Refuse data other than the experiment's: its trials' scores would not compare."""
        if self.data_checksum and checksum != self.data_checksum:
            raise SearchError(
                f"experiment {self.name} was started on data with checksum "
                f"{self.data_checksum}, but {source} has checksum {checksum}: resume it on "
                "the same archive, or start a new experiment"
            )

    def discard(self) -> None:
        """Remove what this run made of the experiment (its driver files and Tune's, but not the
        driver's lock nor anything the folder held before): what `search.run` does when a new
        search fails before its first trial or with every trial failed, so that nothing is left
        for a rerun to mistake for a search to resume."""
        for file in DRIVER_FILES:  # this run's own: `new` removed any an earlier start left
            (self.driver / file).unlink(missing_ok=True)
        delete_folder(self.uri, keep=(LOCK_FILE, *self.found))

    def sync(self) -> None:
        """Upload the driver's files to the experiment's storage (shared storage only)."""
        syncer = self.syncer()
        if syncer is not None:
            syncer()

    def syncer(self) -> DriverSync | None:
        """A picklable callable that uploads the driver files, for the searcher to call each
        time Tune saves the experiment's state (None when nothing needs uploading)."""
        return DriverSync(self.driver, self.uri) if self.storage.shared else None


def driver_folder(storage: Storage, name: str) -> Path:
    """The driver folder of experiment `name` in `storage` (see `Experiment.driver`)."""
    return Path("experiments") / name if storage.shared else Path(storage.experiment(name))


@dataclass(frozen=True)
class DriverSync:
    """Uploads the driver folder's files to the experiment's storage when called."""

    driver: Path
    target: str

    def __call__(self) -> None:
        upload_files(self.driver, DRIVER_FILES, self.target)
