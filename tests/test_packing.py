"""Packing trials onto a GPU: the memory check before a search and the packing benchmark."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.packing import aggregate, fits_memory, recommend
from marsseg.config import TrainConfig
from marsseg.errors import SearchError
from marsseg.models import list_models
from marsseg.train import memory
from marsseg.train.memory import run_steps, training_memory
from search import packing
from search.packing import (
    check_gpu_packing,
    check_packing,
    trials_per_gpu,
    worst_case_configs,
)

GIB = 2**30


def test_packing_that_fits_passes():
    check_packing(per_trial_bytes=4 * GIB, free_bytes=80 * GIB, trials_per_gpu=8)  # 32 <= 72
    check_packing(per_trial_bytes=9 * GIB, free_bytes=80 * GIB, trials_per_gpu=8)  # 72 <= 72


def test_packing_that_does_not_fit_names_the_numbers_and_a_larger_share():
    with pytest.raises(SearchError) as err:
        check_packing(per_trial_bytes=20 * GIB, free_bytes=80 * GIB, trials_per_gpu=4)
    message = err.value.args[0]
    assert "\n" not in message
    assert "4 trials per GPU need about 80.0 GiB (20.0 GiB each" in message
    assert "90% of the 80.0 GiB free" in message
    assert "--gpus-per-trial 0.333333 or more (3 per GPU)" in message


def test_packing_when_not_even_one_trial_fits():
    with pytest.raises(SearchError, match="even one trial does not fit"):
        check_packing(per_trial_bytes=75 * GIB, free_bytes=80 * GIB, trials_per_gpu=2)


@pytest.mark.parametrize("fits", [1, 2, 3, 7, 9, 30, 99])
def test_suggested_share_places_exactly_that_many_trials(fits):
    per_trial = GIB
    free = math.ceil((fits + 0.5) * per_trial / 0.9)  # room for `fits` trials, not `fits + 1`
    with pytest.raises(SearchError) as err:
        check_packing(per_trial, free, fits + 1)
    share = float(err.value.args[0].split("--gpus-per-trial ")[1].split()[0])
    assert trials_per_gpu(share) == fits


def test_trials_per_gpu_as_ray_packs_them():
    assert [trials_per_gpu(g) for g in (1, 0.5, 1 / 3, 0.3, 0.25, 0.125)] == [1, 2, 3, 3, 4, 8]


def test_training_memory_is_none_on_cpu():
    assert training_memory(TrainConfig(), images=64, device="cpu") is None


def test_measured_steps_run_the_real_training_path_on_cpu(monkeypatch):
    """What the GPU probe runs, on the CPU: `steps` training steps at the config's batch size,
    distance maps and class weights included, then a validation pass. Guards against a probe
    that measures less than a trial holds (fewer steps or batches, no distance maps, no
    validation): the test ran it without checking any of that."""
    config = TrainConfig.from_dict(
        {
            "model": {"name": "segformer", "knobs": {"embed_dim": 16, "blocks_per_stage": 1}},
            "loss": {"boundary_ramp": 0.01, "class_weights": "inverse"},
            "batch_size": 2,
        }
    )
    steps, validated = [], []
    train_epoch, predict_logits = memory.train_epoch, memory.predict_logits

    def training(model, criterion, optimizer, batches, *args, **kwargs):
        def recorded():
            for images, masks, dist in batches:
                weighted = criterion.class_weights is not None
                steps.append((tuple(images.shape), tuple(dist.shape), weighted))
                yield images, masks, dist

        return train_epoch(model, criterion, optimizer, recorded(), *args, **kwargs)

    def validation(model, images, *args, **kwargs):
        validated.append(len(images))
        yield from predict_logits(model, images, *args, **kwargs)

    monkeypatch.setattr(memory, "train_epoch", training)
    monkeypatch.setattr(memory, "predict_logits", validation)
    run_steps(config, images=3, device=torch.device("cpu"), steps=2)
    assert steps == [((2, 1, 64, 128), (2, 4, 64, 128), True)] * 2
    assert validated == [3]


def test_worst_case_is_every_architecture_at_batch_64_with_distance_maps():
    configs = worst_case_configs(TrainConfig.from_dict({"augment": {"intensity": 0.5}}))
    assert [c.model.name for c in configs] == list_models()
    assert all(c.batch_size == 64 and c.loss.needs_distance_maps for c in configs)
    assert all(c.augment.intensity == 0 for c in configs)  # the training set stays on the GPU


@pytest.fixture
def fake_ray(monkeypatch):
    """Ray as the packing check sees it: one GPU up, and a probe that returns `measured`."""
    state = {"gpus": 1.0, "measured": None, "probes": []}

    class Probe:
        def options(self, **options):
            state["probes"].append(options)
            return self

        def remote(self, configs, images):
            return (configs, images)

    monkeypatch.setattr(packing.ray, "cluster_resources", lambda: {"GPU": state["gpus"]})
    monkeypatch.setattr(packing.ray, "get", lambda ref, timeout=None: state["measured"])
    monkeypatch.setattr(packing, "measure_heaviest", Probe())
    return state


@pytest.mark.parametrize("gpus_per_trial", [0, 1, 2])
def test_packing_check_is_skipped_unless_trials_share_a_gpu(fake_ray, gpus_per_trial):
    check_gpu_packing(TrainConfig(), archive_images=100, gpus_per_trial=gpus_per_trial)
    assert fake_ray["probes"] == []


def test_packing_check_is_skipped_without_a_gpu_node(fake_ray, capsys):
    fake_ray["gpus"] = 0
    check_gpu_packing(TrainConfig(), archive_images=100, gpus_per_trial=0.5)
    assert fake_ray["probes"] == []
    assert "packing check skipped: no GPU node" in capsys.readouterr().out


def test_packing_check_measures_on_a_share_of_a_gpu_and_refuses_what_cannot_fit(fake_ray):
    fake_ray["measured"] = (30 * GIB, 80 * GIB, "unet")
    check_gpu_packing(TrainConfig(), archive_images=100, gpus_per_trial=0.5)  # 60 <= 72
    assert fake_ray["probes"] == [{"num_gpus": 0.5}]
    with pytest.raises(SearchError, match=r"3 trials per GPU need about 90\.0 GiB"):
        check_gpu_packing(TrainConfig(), archive_images=100, gpus_per_trial=0.3)


def test_packing_check_is_skipped_where_torch_sees_no_gpu(fake_ray, capsys):
    fake_ray["measured"] = None  # a node that declares a GPU torch cannot use
    check_gpu_packing(TrainConfig(), archive_images=100, gpus_per_trial=0.5)
    assert "torch sees no CUDA device" in capsys.readouterr().out


# --- the packing benchmark's rules ---------------------------------------------------------------


def _row(trials: int, rate: float, fits: bool = True) -> dict:
    return {"trials": trials, "aggregate_images_per_s": rate, "fits": fits}


def test_recommendation_is_the_last_count_that_still_gains_ten_percent():
    rows = [_row(1, 1000), _row(2, 1800), _row(4, 2100), _row(8, 2150)]
    assert recommend(rows) == 4  # 2100 >= 1.1 * 1800; 2150 < 1.1 * 2100
    assert recommend([_row(1, 1000), _row(2, 1050), _row(4, 3000)]) == 1  # stops at the first stall
    assert recommend(list(reversed(rows))) == 4  # order of the rows does not matter


def test_recommendation_stops_where_memory_runs_out():
    assert recommend([_row(1, 1000), _row(2, 1900), _row(4, 3000, fits=False)]) == 2
    assert recommend([_row(1, 1000, fits=False)]) is None


def test_aggregate_counts_every_trial_over_the_whole_concurrent_span():
    reports = [
        {"start": 10.0, "end": 20.0, "images": 1000},
        {"start": 11.0, "end": 30.0, "images": 1000},
    ]
    assert aggregate(reports) == pytest.approx(2000 / 20)


def test_fits_memory_uses_the_search_check():
    assert fits_memory(None, None, 8)  # CPU: nothing to check
    assert fits_memory(8 * GIB, 80 * GIB, 8)
    assert not fits_memory(10 * GIB, 80 * GIB, 8)
