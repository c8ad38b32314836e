"""Training runs as Ray tasks: they hold the CPUs they asked for, and a `RunStore` keeps them."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import ray
import torch

from marsseg.config import TrainConfig
from marsseg.data import archive_from_arrays
from marsseg.data.synthetic import generate
from marsseg.errors import CheckpointError, ConfigError
from search import tasks
from search.runstore import RunStore
from search.tasks import Run, train_runs

EPOCHS = 20


def reporting_task(config, archive, split, *, on_epoch, marks, **_):
    """Reports `EPOCHS` epochs, 0.4 s apart, and records when it started and ended."""
    start = time.time()
    for epoch in range(1, EPOCHS + 1):
        time.sleep(0.4)
        metrics = {"epoch": epoch, "train_loss": 1.0 / epoch, "lr": 1e-3, "epoch_time_s": 0.4}
        on_epoch({**metrics, "stop_reason": "max_epochs" if epoch == EPOCHS else ""})
    (marks / f"{config.seed}.json").write_text(json.dumps([start, time.time()]))
    return {"seed": config.seed}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_tasks_that_report_epochs_keep_their_cpu(ray_env, tmp_path, capsys, monkeypatch):
    """Three 1-CPU runs on 2 CPUs: never three at once (a task blocked in `ray.get` lends its
    CPU to the queue), and every epoch line of a run is printed while the run goes on, all of
    them before its result comes back (not only once it has ended: a driver that waited for a
    task to end before printing its lines would pass the second check alone).

    Each run lasts 8 s: longer than a new Ray worker takes to start and import the project, so
    a lent CPU would have the queued run going beside the other two."""
    printed_at: dict[str, float] = {}
    write = tasks.tqdm.write

    def timed(line, *args, **kwargs):
        printed_at.setdefault(line.split("  epoch")[0], time.time())  # a run's first line
        write(line, *args, **kwargs)

    monkeypatch.setattr(tasks.tqdm, "write", staticmethod(timed))
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    s = generate(n_train=8, n_test=1, seed=0, n_aliens=0)
    archive = archive_from_arrays(s.training_set, s.test_set)
    split = (np.arange(6), np.arange(6, 8))
    config = TrainConfig().replace(max_epochs=EPOCHS)
    runs = {seed: Run(f"run {seed}", config.replace(seed=seed), split) for seed in range(3)}
    results, printed = {}, ""
    for key, result, reason in train_runs(
        runs, archive, cpus=1, gpus=0, task=reporting_task, marks=tmp_path
    ):
        assert reason is None
        results[key] = result
        printed += capsys.readouterr().out
        lines = [line for line in printed.splitlines() if line.startswith(f"run {key}  epoch")]
        assert len(lines) == EPOCHS, printed  # all of them, before the result
    assert results == {seed: {"seed": seed} for seed in range(3)}
    intervals = [tuple(json.loads((tmp_path / f"{seed}.json").read_text())) for seed in range(3)]
    assert most_at_once(intervals) == 2, intervals
    for seed, (start, end) in enumerate(intervals):
        # Epoch 1 ends 0.4 s in and the driver polls every second; the run lasts 8 s.
        assert printed_at[f"run {seed}"] < (start + end) / 2, (seed, start, end, printed_at)


def test_a_run_store_keeps_results_and_refuses_another_plan(tmp_path):
    store = RunStore(tmp_path / "folds")
    plan = {"folds": 3, "config": TrainConfig().to_dict(), "data_checksum": "ab"}
    assert store.open(plan) == []
    probs = np.random.default_rng(0).random((2, 5, 4, 4)).astype(np.float16)
    result = {"probs": probs, "weights": {"w": torch.ones(2)}, "history": [{"epoch": 1}]}
    store.checkpoints(0, "fold 1/3").latest.parent.mkdir(parents=True)
    store.checkpoints(0, "fold 1/3").latest.write_bytes(b"an epoch")
    store.save_result(0, "fold 1/3", result)
    assert store.checkpoints(0, "fold 1/3").existing() == []  # superseded by the result
    again = store.result(0, "fold 1/3")
    np.testing.assert_array_equal(again["probs"], probs)
    assert again["probs"].dtype == np.float16 and again["history"] == [{"epoch": 1}]
    assert torch.equal(again["weights"]["w"], torch.ones(2))
    assert store.result(1, "fold 2/3") is None
    assert store.open(plan) == ["00-fold-1-3"]  # the same plan continues

    # The same trial exported again: a new time stamp and code version, the same training.
    exported = TrainConfig(provenance={"trial": "t1", "exported": "19:23", "code_version": "2"})
    assert store.open({**plan, "config": exported.to_dict()}) == ["00-fold-1-3"]

    other = {**plan, "folds": 5, "config": TrainConfig(seed=3).to_dict()}
    with pytest.raises(ConfigError, match=r"differs in config\.seed, folds\); rerun with the same"):
        store.open(other)
    assert store.result(0, "fold 1/3") is not None  # refused: nothing touched
    assert store.open(other, force=True) == []  # --force starts over
    assert store.result(0, "fold 1/3") is None


def test_a_run_store_names_a_damaged_result_and_leaves_nothing_when_nothing_ran(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.open({"seeds": [0, 1]})
    store.discard_if_empty()
    assert not store.root.exists()  # a start that failed at once leaves no folder
    store.open({"seeds": [0, 1]})
    store.folder(0, "a seed 0").mkdir()
    (store.folder(0, "a seed 0") / "result.pt").write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match=r"result .*result\.pt cannot be read"):
        store.result(0, "a seed 0")
    store.discard_if_empty()
    assert store.root.exists()  # something was saved: kept
