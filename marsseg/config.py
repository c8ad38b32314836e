"""One configuration schema for a training run, shared by the trainer, search and final stage.

A `TrainConfig` says everything that decides a run's outcome: architecture and knobs, loss,
augmentation, oversampling, optimiser, LR schedule, early stopping, batch size, epochs, seed and
precision. It is a tree of frozen dataclasses, each validating itself on construction, and it
loads from and saves to YAML or JSON with the same names. Unknown keys and bad values are
`ConfigError`s whose one-line message names the dotted field (`optim.lr must be > 0, got 0`).
Saving then loading gives back an equal config, so a config exported by a search retrains the
same run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from marsseg.augment import AugmentConfig
from marsseg.errors import ConfigError
from marsseg.fileio import atomic_path
from marsseg.losses import LossConfig
from marsseg.models import build_model, list_models, model_knobs
from marsseg.sampling import check_oversample_rate
from marsseg.yamlfile import read_yaml_mapping

SCHEMA_VERSION = 1
"""Bumped whenever a field changes meaning, so an old config fails loudly instead of silently."""
PRECISIONS = ("auto", "fp32", "bf16")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """An architecture from the registry and its knobs (any left out take their defaults)."""

    name: str = "marsseg"
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = ", ".join(list_models())
        _check(
            self.name in list_models(),
            f"model.name: unknown architecture {self.name!r}; registered: {known}",
        )
        allowed = {knob.name: knob for knob in model_knobs(self.name)}
        for key in self.knobs:
            _check(
                key in allowed,
                f"model.knobs.{key}: {self.name} has no such knob; its knobs are: "
                f"{', '.join(allowed)}",
            )
        # Store every knob, defaults included, in canonical types (a sampler's numpy scalars
        # become plain numbers): two configs that build the same model compare equal, and an
        # exported config shows the whole architecture.
        canonical = {
            name: knob.validate(
                self.knobs.get(name, knob.default), owner=f"model.knobs: {self.name}"
            )
            for name, knob in allowed.items()
        }
        object.__setattr__(self, "knobs", canonical)

    def build(self) -> Any:
        return build_model(self.name, **self.knobs)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW: the reference recipe's optimiser (lr 1e-4)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}",
        )


SCHEDULES = ("plateau", "onecycle", "cosine", "constant")


@dataclass(frozen=True)
class SchedulerConfig:
    """The learning-rate schedule; `plateau` (ReduceLROnPlateau on val mIoU) is the reference's.

    The other kinds are stepped after every batch over the run's whole `max_epochs`, so two runs
    with one budget follow the same curve whatever early stopping does ("Budgeted Training",
    ICLR 2020: at a fixed budget, schedules that decay to the end beat step and plateau ones):

    - `onecycle`: torch's OneCycleLR, rising from lr / 25 to `optim.lr` over the first
      `warmup_fraction` of the steps, then cosine-annealed to lr / 25e4;
    - `cosine`: linear warmup from lr / 25 over `warmup_fraction` of the steps, then a cosine
      decay to `min_lr`;
    - `constant`: `optim.lr` throughout (a baseline for the others).

    `factor` and `patience` are plateau's; `min_lr` is plateau's floor and cosine's end.
    """

    kind: Literal["plateau", "onecycle", "cosine", "constant"] = "plateau"
    factor: float = 0.5
    patience: int = 5
    min_lr: float = 1e-6
    warmup_fraction: float = 0.3

    def __post_init__(self) -> None:
        _check(
            self.kind in SCHEDULES,
            f"scheduler.kind must be one of {', '.join(SCHEDULES)}, got {self.kind!r}",
        )
        _check(0 < self.factor < 1, f"scheduler.factor must be in (0, 1), got {self.factor}")
        _check(self.patience >= 0, f"scheduler.patience must be >= 0, got {self.patience}")
        _check(self.min_lr >= 0, f"scheduler.min_lr must be >= 0, got {self.min_lr}")
        _check(
            0 < self.warmup_fraction < 1,
            f"scheduler.warmup_fraction must be in (0, 1), got {self.warmup_fraction}",
        )

    @property
    def per_batch(self) -> bool:
        """True for the kinds stepped after every batch (all but `plateau`)."""
        return self.kind != "plateau"


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when validation mIoU has not improved by `min_delta` for `patience` epochs."""

    patience: int = 12
    min_delta: float = 1e-3

    def __post_init__(self) -> None:
        _check(self.patience >= 1, f"early_stopping.patience must be >= 1, got {self.patience}")
        _check(self.min_delta >= 0, f"early_stopping.min_delta must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's outcome; the defaults are the reference recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    oversample: float = 4.0
    """How many times per epoch an image holding big rock (class 4) is seen; fractions sampled."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights (0: off). When on, the average
    (BatchNorm statistics included) is what validation scores, checkpoints keep and fit returns."""
    batch_size: int = 32
    max_epochs: int = 100
    val_fraction: float = 0.2
    """Share of the cleaned training images held out (stratified on big rock); 0 trains on all."""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    """torch.compile the model (CUDA only; off until measured to help)."""
    schema_version: int = SCHEMA_VERSION
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """Where the config came from (search, trial, score, data checksum, code version): kept in
    exported files for people, ignored by training and by config comparison."""

    def __post_init__(self) -> None:
        _check(
            self.schema_version == SCHEMA_VERSION,
            f"schema_version {self.schema_version} is not supported (this code reads "
            f"{SCHEMA_VERSION}); re-export the config with this version",
        )
        check_oversample_rate(self.oversample, "oversample")
        _check(
            self.ema_decay == 0 or 0.5 <= self.ema_decay < 1,
            f"ema_decay must be 0 (off) or in [0.5, 1), got {self.ema_decay}",
        )
        _check(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        _check(self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}")
        _check(
            0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"
        )
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )

    # --- conversion -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (tuples become lists), ready for YAML or JSON."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any]) -> TrainConfig:
        """Build and validate from nested dicts; unknown keys and wrong types name their field."""
        return _build(cls, data, "")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with top-level fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as YAML (`.yaml`/`.yml`) or JSON (`.json`)."""
        path = Path(path)
        text = (
            json.dumps(self.to_dict(), indent=2)
            if path.suffix == ".json"
            else yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        with atomic_path(path) as temp:
            temp.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML (1.2 numbers: `lr: 3e-4`) or JSON config; a missing file or a syntax error
        is one clear line."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a config file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
            except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
                raise ConfigError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
        else:
            data = read_yaml_mapping(path, "config fields")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key written twice (`json` would keep the last)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} given twice in one object")
        seen.add(key)
    return dict(pairs)


PLAIN = TrainConfig(
    model=ModelConfig("unet", {"depth": 4, "base_channels": 16}),
    augment=AugmentConfig(preset="none", random_flip=True),
    oversample=1.0,
    optim=OptimConfig(lr=3e-3, weight_decay=1e-4),
    scheduler=SchedulerConfig(kind="onecycle"),
    early_stopping=EarlyStoppingConfig(patience=20),
    max_epochs=20,
)
PRESETS: dict[str, TrainConfig] = {"reference": TrainConfig(), "plain": PLAIN}
"""Named configurations.

- `reference`: the reference team's recipe, which is also what every default spells: MarsSeg,
  cross-entropy that ignores background, AdamW lr 1e-4, ReduceLROnPlateau on val mIoU, early
  stopping, offline horizontal flip + MaskDropout on a quarter, big-rock images oversampled 4x.
- `plain`: a well-trained baseline with no search: a 4-level U-Net of width 16 (BatchNorm +
  ReLU), cross-entropy that ignores background, a random horizontal flip, AdamW with OneCycle
  (peak lr 3e-3, weight decay 1e-4), batch 32, 20 epochs, no oversampling and no early stopping
  inside its budget. The bar any searched configuration must clear.
"""


def preset(name: str) -> TrainConfig:
    _check(name in PRESETS, f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- generic dataclass building ------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and value types field by field."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{where} must be a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field (known in {where}: {', '.join(sorted(known))})"
        )
    values = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Check `value` against a field's type hint and convert lists to tuples where declared."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    if origin is Literal:
        return value  # the dataclass checks the allowed values with a better message
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is tuple:
        _expect(isinstance(value, (list, tuple)), name, "a list", value)
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, name) for v in value)
    if origin is dict or hint is Any:
        if origin is dict:
            _expect(isinstance(value, typing.Mapping), name, "a mapping", value)
            return dict(value)
        return value
    if hint is bool:
        _expect(isinstance(value, bool), name, "true or false", value)
    elif hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), name, "an integer", value)
    elif hint is float:
        _expect(
            isinstance(value, (int, float)) and not isinstance(value, bool), name, "a number", value
        )
        _expect(math.isfinite(value), name, "a finite number", value)
        return float(value)
    elif hint is str:
        _expect(isinstance(value, str), name, "a string", value)
    return value


def _expect(ok: bool, name: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}")
