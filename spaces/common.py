"""What every search space shares: architecture knobs read from the registry, the training knobs,
and the translation between Optuna's flat parameters and a `TrainConfig`.

Parameter names are flat and dotted (`arch`, `unet.depth`, `loss.dice_weight`, `optim.lr`), so a
trial's config reads as one table in TensorBoard and the leaderboard. Knobs are namespaced by
architecture because Optuna refuses one name with two distributions, and two architectures may
give a knob of the same name different ranges.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from marsseg.config import SCHEDULES, TrainConfig
from marsseg.models import Knob, model_knobs

ARCH = "arch"
BATCH_SIZES = (16, 32, 64)
"""The batch sizes every space samples; the GPU-packing check measures the largest."""
OFF, ON = "off", "on"


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


def suggest_training(
    trial: optuna.Trial, *, max_oversample: float = 8.0, offline_augment: bool = True
) -> None:
    """Loss combination, augmentation, oversampling, optimiser, LR schedule and weight average.

    `max_oversample` and `offline_augment` bound what an epoch costs: oversampling repeats the
    big-rock images, and the offline preset doubles the training set; a space that leaves the
    preset out must fix `augment.preset` itself (in the constants it returns).

    Masked cross-entropy is always on (the reference found it beat everything else); dice,
    Lovasz, boundary and focal terms join it. Class weights are capped (the challenge's best
    teams kept them near 10x; full inverse frequency gives big rock 50-250x). Every range
    contains the reference recipe's value, so the recipe can be enqueued as the first trial of
    any space.
    """
    trial.suggest_float("loss.dice_weight", 0.0, 1.0)
    if trial.suggest_categorical("loss.lovasz", (OFF, ON)) == ON:
        trial.suggest_float("loss.lovasz_weight", 0.1, 1.0)
    if trial.suggest_categorical("loss.boundary", (OFF, ON)) == ON:
        trial.suggest_float("loss.boundary_ramp", 0.002, 0.02, log=True)
    if trial.suggest_categorical("loss.focal", (OFF, ON)) == ON:
        trial.suggest_float("loss.focal_weight", 0.1, 1.0)
        trial.suggest_float("loss.focal_gamma", 1.0, 3.0)
    if (
        trial.suggest_categorical("loss.class_weights", ("none", "inverse_sqrt", "inverse"))
        != "none"
    ):
        trial.suggest_categorical("loss.class_weight_cap", (0.0, 5.0, 10.0, 20.0))
    trial.suggest_float("loss.label_smoothing", 0.0, 0.1)
    if offline_augment:
        trial.suggest_categorical("augment.preset", ("none", "reference"))
    trial.suggest_float("augment.intensity", 0.0, 1.0)
    trial.suggest_categorical("augment.photometric", (False, True))
    trial.suggest_categorical("augment.random_flip", (False, True))
    trial.suggest_float("oversample", 1.0, max_oversample)
    trial.suggest_float("optim.lr", 1e-5, 3e-3, log=True)
    trial.suggest_float("optim.weight_decay", 1e-6, 1e-1, log=True)
    trial.suggest_categorical("batch_size", BATCH_SIZES)
    kind = trial.suggest_categorical("scheduler.kind", SCHEDULES)
    if kind in ("onecycle", "cosine"):
        trial.suggest_float("scheduler.warmup_fraction", 0.05, 0.4)
    if trial.suggest_categorical("ema", (OFF, ON)) == ON:
        trial.suggest_float("ema_decay", 0.99, 0.999)


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


SWITCHES = {
    "loss.boundary": "loss.boundary_ramp",
    "loss.focal": "loss.focal_weight",
    "loss.lovasz": "loss.lovasz_weight",
    "ema": "ema_decay",
}
"""On/off parameters and the config field each one zeroes when off."""


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
    loss = config.loss
    values |= {
        "loss.dice_weight": loss.dice_weight,
        "loss.lovasz": ON if loss.lovasz_weight > 0 else OFF,
        "loss.lovasz_weight": loss.lovasz_weight,
        "loss.class_weight_cap": loss.class_weight_cap,
        "loss.boundary": ON if loss.boundary_ramp > 0 else OFF,
        "loss.boundary_ramp": loss.boundary_ramp,
        "loss.focal": ON if loss.focal_weight > 0 else OFF,
        "loss.focal_weight": loss.focal_weight,
        "loss.focal_gamma": loss.focal_gamma,
        "loss.class_weights": loss.class_weights,
        "loss.label_smoothing": loss.label_smoothing,
        "augment.preset": config.augment.preset,
        "augment.intensity": config.augment.intensity,
        "augment.photometric": config.augment.photometric,
        "augment.random_flip": config.augment.random_flip,
        "oversample": config.oversample,
        "optim.lr": config.optim.lr,
        "optim.weight_decay": config.optim.weight_decay,
        "batch_size": config.batch_size,
        "scheduler.kind": config.scheduler.kind,
        "scheduler.warmup_fraction": config.scheduler.warmup_fraction,
        "ema": ON if config.ema_decay > 0 else OFF,
        "ema_decay": config.ema_decay,
    }
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
