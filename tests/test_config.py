"""The training-config schema: round trips, presets and one-line errors naming the field."""

from __future__ import annotations

import pytest

from marsseg.config import ModelConfig, OptimConfig, TrainConfig, preset
from marsseg.errors import ConfigError


def _custom() -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"name": "unet", "knobs": {"depth": 3, "base_channels": 16}},
            "loss": {"ce_weight": 1.0, "dice_weight": 0.5, "class_weights": "inverse_sqrt"},
            "augment": {"preset": "none", "intensity": 0.3},
            "oversample": 2.5,
            "optim": {"lr": 3e-4, "betas": [0.8, 0.99]},
            "batch_size": 16,
            "seed": 7,
        }
    )


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_is_exact(tmp_path, suffix):
    for config in (TrainConfig(), _custom()):
        path = config.save(tmp_path / f"c{suffix}")
        assert TrainConfig.load(path) == config
        assert TrainConfig.from_dict(config.to_dict()) == config


def test_reference_preset_is_the_recipe():
    ref = preset("reference")
    assert ref.model.name == "marsseg"
    assert ref.loss.ce_weight == 1 and ref.loss.dice_weight == ref.loss.boundary_weight == 0
    assert ref.optim.lr == 1e-4
    assert ref.augment.preset == "reference" and ref.augment.intensity == 0
    assert ref.oversample == 4


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"optim": {"lr": 0}}, "optim.lr must be > 0, got 0"),
        ({"optim": {"lr": -1e-3}}, "optim.lr must be > 0"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number, got 'fast'"),
        ({"model": {"name": "resnet"}}, "model.name: unknown architecture 'resnet'; registered:"),
        ({"model": {"name": "unet", "knobs": {"width": 2}}}, "model.knobs.width: unet has no"),
        ({"model": {"name": "unet", "knobs": {"depth": 40}}}, "knob 'depth' must be in [2, 5]"),
        ({"batchsize": 8}, "batchsize: unknown field (known in config:"),
        ({"optim": {"learning_rate": 1}}, "optim.learning_rate: unknown field"),
        ({"loss": {"dice_weight": -1}}, "loss.dice_weight"),
        ({"augment": {"intensity": 1.5}}, "augment.intensity must be in [0, 1]"),
        ({"oversample": 0.5}, "oversample must be a finite number >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
        ({"precision": "fp8"}, "precision must be one of auto, fp32, bf16"),
        ({"schema_version": 99}, "schema_version 99 is not supported"),
        ({"optim": {"betas": [0.9]}}, "optim.betas must be two numbers"),
        ({"optim": 3}, "optim must be a mapping of fields, got int"),
    ],
)
def test_bad_config_names_the_field(data, expected):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(data)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.load(listing)


def test_knob_values_are_stored_canonically():
    import numpy as np

    config = ModelConfig("unet", {"depth": np.int64(3), "dropout": np.float64(0.25)})
    assert type(config.knobs["depth"]) is int and type(config.knobs["dropout"]) is float


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3e-4", 3e-4), ("1E-5", 1e-5), ("2.5e+3", 2500.0), ("-1e-2", -0.01), (".5e1", 5.0)],
)
def test_yaml_12_exponent_numbers_are_floats(tmp_path, text, expected):
    """`lr: 3e-4` is a float in YAML 1.2 (and JSON); PyYAML's 1.1 rules read it as a string."""
    path = tmp_path / "config.yaml"
    path.write_text(f"optim:\n  lr: {text}\n")
    if expected > 0:
        assert TrainConfig.load(path).optim.lr == pytest.approx(expected)
    else:  # a number, so the range check speaks, not the type check
        with pytest.raises(ConfigError, match=r"optim\.lr must be > 0"):
            TrainConfig.load(path)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("optim:\n  lr: '3e-4'\n", "optim.lr must be a number"),  # quoted: still a string
        ("optim:\n  lr: 3e\n", "optim.lr must be a number"),  # no exponent digits
        ("optim:\n  lr: e-4\n", "optim.lr must be a number"),
        ("max_epochs: 1e2\n", "max_epochs must be"),  # a float, not an integer
    ],
)
def test_yaml_numbers_loosen_nothing_else(tmp_path, body, expected):
    path = tmp_path / "config.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=expected):
        TrainConfig.load(path)


def test_saved_configs_with_small_floats_round_trip(tmp_path):
    config = TrainConfig().replace(optim=OptimConfig(lr=3e-5, weight_decay=1e-6))
    assert TrainConfig.load(config.save(tmp_path / "c.yaml")) == config


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("c.yaml", "batch_size: 4\nseed: 1\nbatch_size: 8\n", "line 3, column 1: key 'batch_size'"),
        ("c.yaml", "optim:\n  lr: 1.0e-3\n  lr: 3.0e-3\n", "'lr' given twice (first at line 2)"),
        ("c.json", '{"optim": {"lr": 0.001, "lr": 0.003}}', "not valid JSON (key 'lr' given twice"),
    ],
)
def test_a_key_written_twice_is_refused(tmp_path, name, body, expected):
    """YAML and JSON parsers keep the last of two equal keys: the first value would be lost."""
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        TrainConfig.load(path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 1.0e-3, weight_decay: 0.0}\noptim:\n  <<: *b\n  lr: 3.0e-3\n")
    from marsseg.yamlfile import read_yaml_mapping

    assert read_yaml_mapping(path, "fields")["optim"] == {"lr": 3e-3, "weight_decay": 0.0}
