"""The model registry and every registered architecture: shapes, gradients, knobs, errors."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marsseg.classes import IMAGE_SHAPE, NUM_CLASSES
from marsseg.errors import ConfigError
from marsseg.models import Knob, build_model, list_models, model_knobs, register_model
from marsseg.models import registry as registry_module
from marsseg.models.__main__ import main as table_main

ARCHITECTURES = list_models()


def knob_extreme(knob: Knob, end: str) -> Any:
    """The smallest (`end="low"`) or largest (`"high"`) value a knob accepts."""
    if knob.kind == "bool":
        return end == "high"
    if knob.kind == "categorical":
        return knob.choices[0 if end == "low" else -1]
    if end == "low":
        return knob.low
    if knob.step is None:
        return knob.high
    return knob.low + (knob.high - knob.low) // knob.step * knob.step


def corner(name: str, end: str) -> dict[str, Any]:
    """Every knob of `name` at the same end of its range."""
    return {knob.name: knob_extreme(knob, end) for knob in model_knobs(name)}


def extreme_settings() -> list[Any]:
    """Per architecture: defaults, all knobs low, all high, and each knob alone at each end."""
    cases = []
    for name in ARCHITECTURES:
        cases.append(pytest.param(name, {}, id=f"{name}-default"))
        cases += [
            pytest.param(name, corner(name, end), id=f"{name}-all-{end}") for end in ("low", "high")
        ]
        for knob in model_knobs(name):
            for end in ("low", "high"):
                value = knob_extreme(knob, end)
                if value != knob.default:
                    cases.append(
                        pytest.param(name, {knob.name: value}, id=f"{name}-{knob.name}={value}")
                    )
    return cases


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """Two shared CPU cores: one torch thread per test keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_registry_holds_the_compared_architectures():
    expected = {"marsseg", "unet", "unetpp", "deeplabv3plus", "segformer", "segnet"}
    assert expected <= set(ARCHITECTURES)
    assert sorted(ARCHITECTURES) == ARCHITECTURES


@pytest.mark.parametrize(("name", "knobs"), extreme_settings())
def test_maps_images_to_logits_and_every_parameter_learns(name, knobs, labelled_batch):
    images, masks = labelled_batch
    model = build_model(name, **knobs).train()
    logits = model(images[:2])
    assert logits.shape == (2, NUM_CLASSES, *IMAGE_SHAPE)
    F.cross_entropy(logits, masks[:2]).backward()
    dead = [
        pname
        for pname, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()
    ]
    assert not dead, f"{name} {knobs}: parameters without a usable gradient: {dead}"


@pytest.mark.parametrize("size", [(32, 64), (96, 192), (50, 90)])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_eval_keeps_any_input_size_with_batch_of_one(name, size):
    model = build_model(name).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 1, *size))
    assert logits.shape == (1, NUM_CLASSES, *size)


def small_knobs(name: str) -> dict[str, Any]:
    """Numeric knobs at their smallest and categoricals at their first choice; switches stay at
    their defaults so the blocks they enable (PSA, BatchNorm) are trained too."""
    return {
        knob.name: knob.default if knob.kind == "bool" else knob_extreme(knob, "low")
        for knob in model_knobs(name)
    }


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_overfits_one_batch(name, labelled_batch):
    images, masks = labelled_batch
    model = build_model(name, **small_knobs(name)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] <= 0.2 * losses[0]:
            break
    assert losses[-1] <= 0.2 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_unknown_architecture_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'unett'") as err:
        build_model("unett")
    assert all(name in str(err.value) for name in ARCHITECTURES)


def test_unknown_knob_lists_the_architecture_knobs():
    with pytest.raises(ConfigError, match="unet has no knob 'widht'") as err:
        build_model("unet", widht=2)
    assert all(knob.name in str(err.value) for knob in model_knobs("unet"))


@pytest.mark.parametrize(
    ("name", "knobs", "message"),
    [
        ("marsseg", {"width": 3}, "marsseg knob 'width' must be in [0.125, 0.5], got 3"),
        ("unet", {"depth": 9}, "unet knob 'depth' must be in [2, 5], got 9"),
        ("unet", {"depth": 2.5}, "unet knob 'depth' must be an int in [2, 5], got 2.5"),
        ("unet", {"batch_norm": 1}, "unet knob 'batch_norm' must be True or False, got 1"),
        (
            "marsseg",
            {"output_stride": 32},
            "marsseg knob 'output_stride' must be one of (8, 16), got 32",
        ),
        (
            "segformer",
            {"decoder_channels": 40},
            "segformer knob 'decoder_channels' must be in [32, 256] in steps of 32, got 40",
        ),
        ("segnet", {"dropout": "0.1"}, "segnet knob 'dropout' must be a number in [0.0, 0.5]"),
    ],
)
def test_bad_knob_value_names_the_allowed_values(name, knobs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(name, **knobs)


def test_numpy_scalars_from_a_sampler_are_accepted():
    model = build_model("unet", depth=np.int64(2), dropout=np.float32(0.25), batch_norm=np.True_)
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_knobs_describe_themselves(name):
    for knob in model_knobs(name):
        assert knob.help, f"{name}.{knob.name} has no help line"
        assert knob.validate(knob.default, owner=name) == knob.default


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "int", "default": 9, "low": 1, "high": 4},  # default out of range
        {"kind": "float", "default": 0.5, "low": 0.1, "high": 1.0, "step": 1},  # step on a float
        {"kind": "int", "default": 2, "low": 0, "high": 4, "log": True},  # log through zero
        {"kind": "categorical", "default": "a", "choices": ()},  # no choices
        {"kind": "string", "default": "a"},  # unknown kind
    ],
)
def test_malformed_knob_definitions_fail_at_import(kwargs):
    with pytest.raises(ValueError):
        Knob("x", **kwargs)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, so that test registrations vanish afterwards."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_a_new_architecture_joins_with_the_decorator_alone(scratch_registry):
    @register_model("tiny", knobs=(Knob("hidden", "int", 4, low=2, high=8, help="width"),))
    class Tiny(nn.Sequential):
        def __init__(self, hidden: int = 4) -> None:
            super().__init__(nn.Conv2d(1, hidden, 3, padding=1), nn.Conv2d(hidden, NUM_CLASSES, 1))

    assert "tiny" in list_models()
    assert model_knobs("tiny")[0].name == "hidden"
    assert isinstance(build_model("tiny", hidden=8), Tiny)


def test_registration_rejects_knobs_that_disagree_with_the_constructor(scratch_registry):
    knob = Knob("hidden", "int", 4, low=2, high=8, help="width")
    with pytest.raises(ValueError, match=r"'hidden'.*default 6"):
        register_model("drifted", knobs=(knob,))(lambda hidden=6: nn.Identity())
    with pytest.raises(ValueError, match=r"'hidden'.*missing"):
        register_model("unlisted", knobs=(knob,))(lambda: nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet")(lambda: nn.Identity())


@pytest.mark.parametrize(("output_stride", "deep_size"), [(8, (8, 16)), (16, (4, 8))])
def test_marsseg_taps_have_the_papers_resolutions(output_stride, deep_size):
    model = build_model("marsseg", output_stride=output_stride).eval()
    with torch.no_grad():
        taps = model.encoder(torch.rand(1, 1, *IMAGE_SHAPE))
    sizes = {name: tuple(t.shape[-2:]) for name, t in taps._asdict().items()}
    assert sizes == {"f1": (32, 64), "f2": (16, 32), "f3": deep_size, "deep": deep_size}
    assert [t.shape[1] for t in taps] == list(model.encoder.channels)


def test_default_marsseg_is_a_few_million_parameters():
    params = sum(p.numel() for p in build_model("marsseg").parameters())
    assert 1e6 < params < 5e6


def test_table_lists_each_architecture(capsys):
    assert table_main(["--models", "segnet", "unet", "--batch-size", "1", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows] == ["architecture", "segnet", "unet"]


@pytest.mark.parametrize(("stages", "weight"), [(2, 0.5), (3, 1.0), (3, 0.0)])
def test_hunet_records_coarse_logits_for_deep_supervision_in_training_only(
    stages, weight, labelled_batch
):
    images, masks = labelled_batch
    knobs = {"depth": 2, "coarse_channels": 8, "refine_channels": 8}
    model = build_model("hunet", stages=stages, deep_supervision=weight, **knobs)
    model.train()(images[:2])
    assert len(model.aux_logits) == (stages - 1 if weight else 0)
    assert all(t.shape == (2, NUM_CLASSES, *IMAGE_SHAPE) for t in model.aux_logits)
    aux = model.auxiliary_loss(F.cross_entropy, masks[:2])
    if weight:
        aux.backward()
        coarse = model.stages[0].classifier.weight
        assert coarse.grad is not None and coarse.grad.any()
    else:
        assert aux.item() == 0
    with torch.no_grad():
        model.eval()(images[:1])
    assert model.aux_logits == [] and model.auxiliary_loss(F.cross_entropy, masks[:1]) == 0


def test_hmsa_fuses_two_scales_in_training_and_its_scale_set_at_inference(labelled_batch):
    from marsseg.models.hmsa import BASES, SCALE_SETS, TRAIN_SCALES, parse_scales

    images, _ = labelled_batch
    assert set(BASES) <= set(ARCHITECTURES) and not {"hmsa", "hunet"} & set(BASES)
    assert all(1.0 in parse_scales(choice) for choice in SCALE_SETS)
    assert TRAIN_SCALES == (1.0, 0.5)
    model = build_model("hmsa", base="segnet", scales="1.0")
    with torch.no_grad():
        # BatchNorm statistics of real images: with its initial ones an untrained base's
        # logits are one constant at every scale, which no fusion could tell apart.
        model.train()(images)
        # One scale: the base alone, the attention has nothing to weigh.
        single = model.eval()(images[:1])
        assert torch.equal(single, model.base(images[:1]))
    # The base runs once per configured scale, at that scale's size, largest first; the
    # fused logits are not the single scale's. Guards against scales that are ignored.
    wide = build_model("hmsa", base="segnet", scales="0.5,1.0,2.0")
    wide.load_state_dict(model.state_dict())  # the same weights, another scale set
    seen = []
    wide.base.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        wide.eval()
        fused = wide(images[:1])
    assert seen == [(128, 256), (64, 128), (32, 64)]
    assert fused.shape == (1, NUM_CLASSES, *IMAGE_SHAPE) and not torch.allclose(fused, single)
    seen.clear()
    wide.train()(images[:2])
    assert seen == [(64, 128), (32, 64)]  # training always fuses 1.0 and 0.5


@pytest.mark.parametrize(("output_stride", "deep_size"), [(8, (8, 16)), (16, (4, 8))])
def test_efferdeepnet_taps_and_deep_map_resolutions(output_stride, deep_size):
    model = build_model("efferdeepnet", output_stride=output_stride).eval()
    with torch.no_grad():
        taps = model.encoder(torch.rand(1, 1, *IMAGE_SHAPE))
    assert [tuple(t.shape[-2:]) for t in taps] == [(32, 64), (16, 32), deep_size]
    assert [t.shape[1] for t in taps] == list(model.encoder.channels)
