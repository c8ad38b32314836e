"""Search spaces: what they sample, how parameters become configs, and their starting point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import distribution_to_json

from marsseg.config import TrainConfig, preset
from marsseg.errors import ConfigError
from marsseg.models import list_models, model_knobs
from spaces import SPACE_NAMES, get_space, params_to_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_space(space_name: str, n: int, seed: int = 0) -> tuple[optuna.Study, list[dict]]:
    """A study of n trials drawn at random from a space, and the constants each one returned."""
    space = get_space(space_name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    constants = []
    for _ in range(n):
        trial = study.ask()
        constants.append(space.space(trial) or {})
        study.tell(trial, 0.0)
    return study, constants


def sample(space_name: str, n: int, seed: int = 0) -> list[dict]:
    """Parameters (plus the space's constants) of n trials drawn at random from a space."""
    study, constants = run_space(space_name, n, seed)
    return [{**t.params, **c} for t, c in zip(study.trials, constants, strict=True)]


NARROW_SPACES = ("marsseg_small", "marsseg_budget")
BUDGET_SPACES = ("marsseg_budget", "budget")
RECIPE_SPACES = [name for name in SPACE_NAMES if name not in {*NARROW_SPACES, *BUDGET_SPACES}]
"""Every space whose ranges hold the reference recipe's MarsSeg (the narrow ones do not)."""


@pytest.mark.parametrize("name", RECIPE_SPACES)
def test_reference_recipe_is_the_first_point_and_maps_to_the_preset(name):
    space = get_space(name)
    study = optuna.create_study(direction="maximize")
    for point in space.points_to_evaluate:
        study.enqueue_trial(point)
    trial = study.ask()
    params = {**trial.params, **(space.space(trial) or {})}
    assert params_to_config(params, preset("reference")) == preset("reference")
    assert bool(space.points_to_evaluate) == (name != "reference")


def test_default_space_offers_every_registered_architecture_and_its_knobs():
    drawn = sample("default", 150)
    assert {params["arch"] for params in drawn} == set(list_models())
    for params in drawn:
        arch = params["arch"]
        knob_params = {k for k in params if k.startswith(f"{arch}.")}
        assert knob_params == {f"{arch}.{knob.name}" for knob in model_knobs(arch)}
        assert not any(k.split(".")[0] in list_models() and k.split(".")[0] != arch for k in params)


def test_every_sampled_point_is_a_valid_config():
    base = preset("reference")
    for params in sample("default", 60, seed=1) + sample("marsseg", 20, seed=2):
        config = params_to_config(params, base)  # validates every field
        assert config.model.name == params["arch"]
        assert config.optim.lr == params["optim.lr"]
        assert (config.loss.boundary_ramp > 0) == (params["loss.boundary"] == "on")
        assert (config.loss.focal_weight > 0) == (params["loss.focal"] == "on")
        assert config.max_epochs == base.max_epochs  # not sampled: from the base


def test_marsseg_space_fixes_the_architecture():
    assert {params["arch"] for params in sample("marsseg", 20)} == {"marsseg"}


def test_unknown_spaces_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown search space 'nope'; known: default"):
        get_space("nope")
    with pytest.raises(ConfigError, match="cannot load search space 'no_module:space'"):
        get_space("no_module:space")


@pytest.mark.parametrize("name", NARROW_SPACES)
def test_narrow_spaces_keep_marsseg_narrow(name):
    from spaces.marsseg_small import NARROW

    base = preset("reference")
    for params in sample(name, 40, seed=3):
        knobs = params_to_config(params, base).model.knobs
        assert params["arch"] == "marsseg"
        for knob, bounds in NARROW.items():
            assert bounds["low"] <= knobs[knob] <= bounds["high"]


def starting_trials(name: str, base: TrainConfig) -> list[TrainConfig]:
    """The configs of space `name`'s starting points, as a study that enqueued them runs them."""
    space = get_space(name)
    study = optuna.create_study()
    for point in space.points_to_evaluate:
        study.enqueue_trial(point)
    configs = []
    for _ in space.points_to_evaluate:
        trial = study.ask()
        constants = space.space(trial)
        configs.append(params_to_config({**trial.params, **constants}, base))
    return configs


def test_marsseg_small_starts_from_tpe_alone_and_budget_from_plains_recipe():
    """The reference's MarsSeg lies outside both; `marsseg_budget`'s first trial is the plain
    baseline's recipe on its largest MarsSeg, so its search never ends below that."""
    assert get_space("marsseg_small").points_to_evaluate == []
    [config] = starting_trials("marsseg_budget", preset("reference").replace(max_epochs=12))
    plain = preset("plain")
    assert config.model.name == "marsseg" and config.model.knobs["width"] == 0.1875
    for field in ("loss", "augment", "oversample", "optim", "scheduler", "batch_size"):
        assert getattr(config, field) == getattr(plain, field), field
    assert config.ema_decay == plain.ema_decay == 0


def test_budget_space_starts_at_plain_then_its_levers_and_keeps_sizes_near_plains():
    """Its first trial is `preset:plain` itself, whatever the search's base, its second plain
    with the levers set by hand; then U-Nets of plain's depth and about its width, and the
    narrow MarsSegs, both drawn."""
    from spaces.budget import PLAIN_WITH_LEVERS, UNET_SIZE
    from spaces.marsseg_small import NARROW

    base = preset("reference").replace(max_epochs=12)
    starts = starting_trials("budget", base)
    assert len(starts) == 2
    fields = ("model", "loss", "augment", "oversample", "optim", "scheduler", "batch_size")
    for start, expected in zip(starts, (preset("plain"), PLAIN_WITH_LEVERS), strict=True):
        for field in (*fields, "ema_decay"):
            assert getattr(start, field) == getattr(expected, field), field
    assert starts[0].ema_decay == 0 and starts[1].ema_decay == 0.995
    assert starts[1].loss.lovasz_weight == 0.5 and starts[1].oversample == 2.0
    configs = [params_to_config(params, base) for params in sample("budget", 40, seed=6)]
    assert {c.model.name for c in configs} == {"unet", "marsseg"}
    for config in configs:
        bounds = UNET_SIZE if config.model.name == "unet" else NARROW
        for knob, bound in bounds.items():
            assert bound["low"] <= config.model.knobs[knob] <= bound["high"], (config.model, knob)


def test_schedules_ema_lovasz_and_weight_caps_are_sampled_into_the_config():
    base = preset("reference")
    drawn = sample("marsseg", 80, seed=4)
    configs = [params_to_config(params, base) for params in drawn]
    assert {c.scheduler.kind for c in configs} == {"plateau", "onecycle", "cosine", "constant"}
    for params, config in zip(drawn, configs, strict=True):
        assert config.scheduler.kind == params["scheduler.kind"]
        assert (config.ema_decay > 0) == (params["ema"] == "on")
        assert (config.loss.lovasz_weight > 0) == (params["loss.lovasz"] == "on")
        if "loss.class_weight_cap" in params:
            assert config.loss.class_weight_cap == params["loss.class_weight_cap"]
        assert config.augment.random_flip == params["augment.random_flip"]
    assert any(c.loss.class_weight_cap == 10 for c in configs)


@pytest.mark.parametrize("name", BUDGET_SPACES)
def test_budget_spaces_bound_the_images_an_epoch_holds(name):
    """No offline preset (its flip doubles the set) and big rock shown at most 3x, whatever
    the base config says; everything else is still sampled."""
    from spaces.marsseg_budget import MAX_OVERSAMPLE

    base = preset("reference")  # offline preset, oversample 4: both must be overridden
    drawn = sample(name, 60, seed=5)
    configs = [params_to_config(params, base) for params in drawn]
    assert {c.augment.preset for c in configs} == {"none"}
    assert all(1.0 <= c.oversample <= MAX_OVERSAMPLE for c in configs)
    assert max(c.oversample for c in configs) > 2.0
    assert {c.scheduler.kind for c in configs} == {"plateau", "onecycle", "cosine", "constant"}
    assert {c.ema_decay > 0 for c in configs} == {False, True}
    assert {c.loss.lovasz_weight > 0 for c in configs} == {False, True}
    assert {c.augment.photometric for c in configs} == {False, True}


# --- the spaces as a running search recorded them ------------------------------------------------

REPLAYS = Path(__file__).with_name("space_replays.json")
"""What `replay` recorded of every space when the file was written. A search resumed with other
code must be offered the parameters it was started with: the same names, distributions, order
and conditions (Optuna refuses or mis-samples a resumed study whose space changed). Rewrite it
(`python tests/test_spaces.py`) only for a deliberate change of a space, which breaks resuming
the searches that use it."""
REPLAY_TRIALS = 60


def replay(name: str, trials: int = REPLAY_TRIALS, seed: int = 0) -> dict[str, Any]:
    """What Optuna records of `trials` trials of space `name` under a seeded RandomSampler: each
    parameter's distribution, the order in which each trial asked for its parameters (indices
    into the sorted names), the constants the space returned and its starting points."""
    study, returned = run_space(name, trials, seed)
    constants = [c for i, c in enumerate(returned) if c not in returned[:i]]
    distributions = {}
    for frozen in study.trials:
        for param, dist in frozen.distributions.items():
            distributions[param] = distribution_to_json(dist)
    names = sorted(distributions)
    asked = [" ".join(str(names.index(p)) for p in t.distributions) for t in study.trials]
    record = {
        "distributions": {param: distributions[param] for param in names},
        "asked": asked,
        "constants": constants,
        "points_to_evaluate": get_space(name).points_to_evaluate,
    }
    return json.loads(json.dumps(record))  # tuples as lists, as the file holds them


def distributions(record: dict[str, Any]) -> dict[str, Any]:
    """A record's distributions as Optuna compares them, whatever the layout of its JSON."""
    return {name: json.loads(text) for name, text in record["distributions"].items()}


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_every_space_asks_what_it_asked_when_its_searches_started(name):
    recorded = json.loads(REPLAYS.read_text())[name]
    now = replay(name)
    assert distributions(now) == distributions(recorded)
    assert now["asked"] == recorded["asked"]
    assert now["constants"] == recorded["constants"]
    assert now["points_to_evaluate"] == recorded["points_to_evaluate"]


if __name__ == "__main__":
    REPLAYS.write_text(json.dumps({name: replay(name) for name in SPACE_NAMES}, indent=1) + "\n")
    print(f"wrote {REPLAYS}")
