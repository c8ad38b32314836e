"""What every search space shares: architecture knobs read from the registry, the training knobs,
and the translation between Optuna's flat parameters and a `TrainConfig`.

The training knobs are one table (`training_params`): sampling them (`suggest_training`) and
reading a config as a point of a space (`config_to_params`, the enqueued reference recipe) both
walk it, so a knob added or renamed there is added or renamed in both.

Parameter names are flat and dotted (`arch`, `unet.depth`, `loss.dice_weight`, `optim.lr`), so a
trial's config reads as one table in TensorBoard and the leaderboard. Knobs are namespaced by
architecture because Optuna refuses one name with two distributions, and two architectures may
give a knob of the same name different ranges.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any

import optuna

from marsseg.config import SCHEDULES, TrainConfig
from marsseg.models import Knob, model_knobs

ARCH = "arch"
BATCH_SIZES = (16, 32, 64)
"""The batch sizes every space samples; the GPU-packing check measures the largest."""
OFF, ON = "off", "on"
MAX_OVERSAMPLE = 8.0
"""How often big-rock images may repeat in an epoch, unless a space bounds it lower."""


def suggest_knob(trial: optuna.Trial, name: str, knob: Knob) -> Any:
    """Sample one knob over exactly the range `build_model` accepts."""
    if knob.kind == "int":
        return trial.suggest_int(
            name, int(knob.low), int(knob.high), step=knob.step or 1, log=knob.log
        )
    if knob.kind == "float":
        return trial.suggest_float(name, knob.low, knob.high, log=knob.log)
    choices = (False, True) if knob.kind == "bool" else knob.choices
    return trial.suggest_categorical(name, choices)


def suggest_architecture(trial: optuna.Trial, arch: str) -> None:
    """Sample every knob of `arch`, as its registry entry describes them."""
    for knob in model_knobs(arch):
        suggest_knob(trial, f"{arch}.{knob.name}", knob)


@dataclass(frozen=True)
class Param:
    """One training parameter: its flat name (a dotted path into `TrainConfig`, but for a
    switch), its range or choices, and the parameters it makes the space ask for next."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    """Categorical when set; a float over [low, high] otherwise."""
    then: tuple[Param, ...] = ()
    when: tuple[Any, ...] = ()
    """The values of this parameter under which `then` is asked for, in order."""

    @property
    def zeroes(self) -> str | None:
        """For an on/off switch, the config field it zeroes when off (its first parameter)."""
        return self.then[0].name if self.choices == (OFF, ON) else None

    def suggest(self, trial: optuna.Trial) -> None:
        """Ask `trial` for this parameter, then for `then` when its value is in `when`."""
        if self.choices is None:
            value = trial.suggest_float(self.name, self.low, self.high, log=self.log)
        else:
            value = trial.suggest_categorical(self.name, self.choices)
        if value in self.when:
            for param in self.then:
                param.suggest(trial)

    def value_in(self, config: TrainConfig) -> Any:
        """The value under which this parameter proposes `config`: the field it names; for a
        switch, on when the field it zeroes is set (> 0)."""
        if self.zeroes:
            return ON if _field(config, self.zeroes) > 0 else OFF
        return _field(config, self.name)

    def walk(self) -> Iterator[Param]:
        """This parameter and every one it may ask for, in the order it asks."""
        yield self
        for param in self.then:
            yield from param.walk()


def _field(config: TrainConfig, dotted: str) -> Any:
    return reduce(getattr, dotted.split("."), config)


def switch(name: str, *then: Param) -> Param:
    """An on/off parameter whose `then` is asked for when on; off zeroes the first of them."""
    return Param(name, choices=(OFF, ON), then=then, when=(ON,))


def training_params(
    max_oversample: float = MAX_OVERSAMPLE, offline_augment: bool = True
) -> tuple[Param, ...]:
    """Loss combination, augmentation, oversampling, optimiser, LR schedule and weight average,
    in the order a space asks for them: the one list `suggest_training` samples and
    `config_to_params` reads a config by.

    `max_oversample` and `offline_augment` bound what an epoch costs: oversampling repeats the
    big-rock images, and the offline preset doubles the training set; a space that leaves the
    preset out must fix `augment.preset` itself (in the constants it returns).

    Masked cross-entropy is always on (the reference found it beat everything else); dice,
    Lovasz, boundary and focal terms join it. Class weights are capped (the challenge's best
    teams kept them near 10x; full inverse frequency gives big rock 50-250x). Every range
    contains the reference recipe's value, so the recipe can be enqueued as the first trial of
    any space.
    """
    preset = (Param("augment.preset", choices=("none", "reference")),) if offline_augment else ()
    return (
        Param("loss.dice_weight", 0.0, 1.0),
        switch("loss.lovasz", Param("loss.lovasz_weight", 0.1, 1.0)),
        switch("loss.boundary", Param("loss.boundary_ramp", 0.002, 0.02, log=True)),
        switch(
            "loss.focal", Param("loss.focal_weight", 0.1, 1.0), Param("loss.focal_gamma", 1.0, 3.0)
        ),
        Param(
            "loss.class_weights",
            choices=("none", "inverse_sqrt", "inverse"),
            then=(Param("loss.class_weight_cap", choices=(0.0, 5.0, 10.0, 20.0)),),
            when=("inverse_sqrt", "inverse"),
        ),
        Param("loss.label_smoothing", 0.0, 0.1),
        *preset,
        Param("augment.intensity", 0.0, 1.0),
        Param("augment.photometric", choices=(False, True)),
        Param("augment.random_flip", choices=(False, True)),
        Param("oversample", 1.0, max_oversample),
        Param("optim.lr", 1e-5, 3e-3, log=True),
        Param("optim.weight_decay", 1e-6, 1e-1, log=True),
        Param("batch_size", choices=BATCH_SIZES),
        Param(
            "scheduler.kind",
            choices=SCHEDULES,
            then=(Param("scheduler.warmup_fraction", 0.05, 0.4),),
            when=("onecycle", "cosine"),
        ),
        switch("ema", Param("ema_decay", 0.99, 0.999)),
    )


TRAINING = tuple(param for top in training_params() for param in top.walk())
"""Every training parameter a space may ask for, conditional ones included."""
SWITCHES = {param.name: param.zeroes for param in TRAINING if param.zeroes}
"""On/off parameters and the config field each one zeroes when off."""


def suggest_training(
    trial: optuna.Trial, *, max_oversample: float = MAX_OVERSAMPLE, offline_augment: bool = True
) -> None:
    """Ask `trial` for the training parameters (`training_params` says which and why)."""
    for param in training_params(max_oversample, offline_augment):
        param.suggest(trial)


def params_to_config(params: Mapping[str, Any], base: TrainConfig) -> TrainConfig:
    """The `TrainConfig` a trial's parameters describe; what the space leaves out comes from `base`.

    Knob parameters (`unet.depth`) go to `model.knobs`; the `loss.boundary` and `loss.focal`
    switches zero their term when off; every other name is a dotted path into the config.
    """
    data = base.to_dict()
    arch = params.get(ARCH, base.model.name)
    if arch != base.model.name:
        data["model"] = {"name": arch, "knobs": {}}
    for name, value in params.items():
        if name == ARCH:
            continue
        if name.startswith(f"{arch}."):
            data["model"]["knobs"][name.removeprefix(f"{arch}.")] = value
        elif name in SWITCHES:
            if value == OFF:
                _set(data, SWITCHES[name], 0.0)
        else:
            _set(data, name, value)
    return TrainConfig.from_dict(data)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    for section in sections:
        data = data.setdefault(section, {})  # an unknown section fails in TrainConfig.from_dict
    data[last] = value


def config_to_params(config: TrainConfig, space: Any) -> dict[str, Any]:
    """The parameters under which `space` proposes `config`: how a preset becomes a starting point.

    Raises `ValueError` when the space cannot express the config (a value outside a range or a
    parameter the space needs that the config cannot provide).
    """
    values = {ARCH: config.model.name}
    knobs = {k.name: k.default for k in model_knobs(config.model.name)} | config.model.knobs
    values |= {f"{config.model.name}.{name}": value for name, value in knobs.items()}
    values |= {param.name: param.value_in(config) for param in TRAINING}
    # Replay the space on those values: it keeps exactly the parameters the space asks for
    # (conditional ones included) and fails if a value lies outside a range.
    recorder = _Recorder(values)
    space(recorder)
    return recorder.asked


class _Recorder:
    """A stand-in for `optuna.Trial` that answers from fixed values and records what was asked."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values
        self.asked: dict[str, Any] = {}

    def _answer(self, name: str, check: Any) -> Any:
        if name not in self.values:
            raise ValueError(f"the space asks for {name!r}, which the config does not set")
        value = self.values[name]
        if not check(value):
            raise ValueError(f"{name}={value!r} lies outside the space")
        self.asked[name] = value
        return value

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return self._answer(name, lambda v: low <= v <= high)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, **_: Any) -> int:
        return self._answer(name, lambda v: low <= v <= high and (v - low) % step == 0)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._answer(name, lambda v: v in choices)
