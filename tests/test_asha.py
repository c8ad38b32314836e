"""ResumableASHA: Ray's ASHA decisions, and rungs that survive a resumed search.

Tune keeps no scheduler state in its experiment checkpoint, so Ray's ASHAScheduler resumes with
empty rungs and stops fewer trials; these tests show ResumableASHA decides as Ray's scheduler
does in one run and as the uninterrupted run does across an interruption.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from search.asha import ASHA_STATE, ResumableASHA

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


@dataclass(frozen=True)
class FakeTrial:
    """All a scheduler reads of a trial."""

    trial_id: str


def curve(curve_id: int, epoch: int) -> float:
    """A deterministic learning curve: curves start apart, rise at different rates and cross."""
    if curve_id == 6 and epoch == 3:
        return math.nan  # a diverged validation: Ray's rule neither stops it nor counts it
    start = ((curve_id * 7) % 11) / 22
    rate = ((curve_id * 5) % 7) / 14
    return round(start + rate * (1 - 1 / epoch) + 0.01 * ((curve_id + epoch) % 3), 6)


def _settings(mode: str, max_t: float, grace: float, rf: float) -> dict:
    """What the stock and the resumable scheduler are both given."""
    return {
        "time_attr": "epoch",
        "metric": "val_miou",
        "mode": mode,
        "max_t": max_t,
        "grace_period": grace,
        "reduction_factor": rf,
    }


def ray_asha(mode: str, max_t: float, grace: float, rf: float) -> ASHAScheduler:
    return ASHAScheduler(**_settings(mode, max_t, grace, rf), brackets=1, stop_last_trials=True)


def resumable(mode: str, max_t: float, grace: float, rf: float, state_path=None) -> ResumableASHA:
    return ResumableASHA(**_settings(mode, max_t, grace, rf), state_path=state_path)


def run_stream(
    schedulers: list,
    *,
    max_t: float,
    n_trials: int = 14,
    concurrency: int = 3,
    switch_at: int | None = None,
    rollback: int = 0,
) -> list[tuple[str, float, str]]:
    """Drives schedulers as Tune would and returns every (trial, time, decision).

    Trials start in id order as slots free up and report at their own pace (interleaved); every
    fourth steps its time by 2, so some skip a rung. `schedulers[0]` decides until `switch_at`
    results have been seen, then `schedulers[1]` (a fresh one, as after a resume) is told of
    every trial so far, and running trials go back `rollback` steps (an older checkpoint).
    """
    scheduler = schedulers[0]
    trials = [FakeTrial(f"t{i:02d}") for i in range(n_trials)]
    pace = {t.trial_id: 1.0 + 0.25 * ((i * 3) % 4) for i, t in enumerate(trials)}
    stride = {t.trial_id: 2 if i % 4 == 3 else 1 for i, t in enumerate(trials)}
    waiting = list(trials)
    running: dict[str, list] = {}  # id -> [next report time, steps done, trial]
    added: list[FakeTrial] = []
    log: list[tuple[str, float, str]] = []
    now, seen = 0.0, 0

    def start() -> None:
        while waiting and len(running) < concurrency:
            trial = waiting.pop(0)
            scheduler.on_trial_add(None, trial)
            added.append(trial)
            running[trial.trial_id] = [now + pace[trial.trial_id], 1, trial]

    start()
    while running:
        tid = min(running, key=lambda k: (running[k][0], k))
        now, steps, trial = running[tid]
        t = steps * stride[tid]
        if (steps + int(tid[1:])) % 5 == 0:  # a result without the metric decides nothing
            assert scheduler.on_trial_result(None, trial, {"epoch": t}) == CONTINUE
        result = {"epoch": t, "val_miou": curve(int(tid[1:]), t)}
        decision = scheduler.on_trial_result(None, trial, result)
        assert decision == STOP or t < max_t, f"{tid} went on at {t}, past max_t {max_t}"
        log.append((tid, t, decision))
        seen += 1
        if decision == STOP:
            scheduler.on_trial_complete(None, trial, result)
            del running[tid]
        else:
            running[tid] = [now + pace[tid], steps + 1, trial]
        if seen == switch_at:
            scheduler = schedulers[1]
            for trial in added:
                scheduler.on_trial_add(None, trial)
            for state in running.values():
                state[1] = max(1, state[1] - rollback)
        start()
    return log


def stops(log: list[tuple[str, float, str]], max_t: float) -> dict[str, float]:
    """Trial -> the time ASHA stopped it at, for trials stopped before max_t."""
    return {tid: t for tid, t, d in log if d == STOP and t < max_t}


@pytest.mark.parametrize(
    ("mode", "max_t", "grace", "rf"),
    [("max", 9, 1, 3), ("min", 9, 1, 3), ("max", 20, 1, 2), ("max", 16, 2, 2), ("max", 12, 1, 2.5)],
)
def test_same_decisions_as_ray_asha(mode, max_t, grace, rf, tmp_path):
    expected = run_stream([ray_asha(mode, max_t, grace, rf)], max_t=max_t)
    got = run_stream([resumable(mode, max_t, grace, rf, tmp_path / ASHA_STATE)], max_t=max_t)
    in_memory = run_stream([resumable(mode, max_t, grace, rf)], max_t=max_t)
    assert got == expected
    assert in_memory == expected
    assert stops(expected, max_t), "the stream should make ASHA stop some trials"
    print(f"\n{mode} max_t={max_t} grace={grace} rf={rf}: stopped {stops(got, max_t)}")


@pytest.mark.parametrize("fraction", [1 / 2, 2 / 3])
def test_rungs_survive_a_fresh_instance(fraction, tmp_path):
    max_t, state = 9, tmp_path / "driver" / ASHA_STATE
    uninterrupted = run_stream([ray_asha("max", max_t, 1, 3)], max_t=max_t)
    switch = int(len(uninterrupted) * fraction)
    first = resumable("max", max_t, 1, 3, state)
    resumed = run_stream(
        [first, resumable("max", max_t, 1, 3, state)], max_t=max_t, switch_at=switch
    )
    stock = run_stream(
        [ray_asha("max", max_t, 1, 3), ray_asha("max", max_t, 1, 3)], max_t=max_t, switch_at=switch
    )
    before, after = stops(uninterrupted, max_t), stops(stock, max_t)
    print(f"\n{len(uninterrupted)} results, new scheduler after {switch}")
    print(f"uninterrupted: {len(before)} stopped {before}")
    print(f"resumed ResumableASHA: {len(stops(resumed, max_t))} stopped {stops(resumed, max_t)}")
    print(f"resumed stock ASHAScheduler: {len(after)} stopped {after}")
    assert resumed == uninterrupted
    # Stock ASHA after a resume judges new arrivals against near-empty rungs (the first to
    # reach a rung is never stopped, a rung of one value stops whatever is below it) and judges
    # running trials again at rungs they had passed: other trials are stopped, at other epochs.
    assert stock != uninterrupted and after != before
    if fraction > 1 / 2:
        assert len(after) < len(before)
    # The file is plain JSON (nan included), written atomically: no temporary file is left.
    saved = json.loads(state.read_text())
    assert [r["milestone"] for r in saved["rungs"]] == [9, 3, 1]
    assert math.isnan(saved["rungs"][1]["recorded"]["t06"])
    assert sorted(p.name for p in state.parent.iterdir()) == [ASHA_STATE]


def test_older_checkpoint_re_reports_are_not_counted_twice(tmp_path):
    max_t, state = 9, tmp_path / ASHA_STATE
    uninterrupted = run_stream([resumable("max", max_t, 1, 3)], max_t=max_t, concurrency=1)
    sizes = {m: len(r) for m, r in _final_rungs(max_t, concurrency=1).items()}
    re_reported = 0
    for switch_at in range(1, len(uninterrupted)):
        state.unlink(missing_ok=True)
        first, second = resumable("max", max_t, 1, 3, state), resumable("max", max_t, 1, 3, state)
        log = run_stream(
            [first, second], max_t=max_t, concurrency=1, switch_at=switch_at, rollback=2
        )
        re_reported += len(log) - len(uninterrupted)
        assert set(log) == set(uninterrupted), switch_at  # the same decision each time
        assert {m: len(r) for m, r in second.recorded().items()} == sizes, switch_at
    assert re_reported > len(uninterrupted)  # most switches made a trial report epochs again


def _final_rungs(max_t: float, concurrency: int) -> dict[float, dict[str, float]]:
    scheduler = resumable("max", max_t, 1, 3)
    run_stream([scheduler], max_t=max_t, concurrency=concurrency)
    return scheduler.recorded()


def test_a_stop_lost_by_tune_is_made_again(tmp_path):
    """The driver died after ASHA stopped a trial but before Tune checkpointed that: the trial
    resumes from an older checkpoint and is stopped at its first report."""
    state = tmp_path / ASHA_STATE
    first = resumable("max", 9, 1, 3, state)
    good, bad = FakeTrial("good"), FakeTrial("bad")
    for trial in (good, bad):
        first.on_trial_add(None, trial)
    assert first.on_trial_result(None, good, {"epoch": 1, "val_miou": 0.9}) == CONTINUE
    assert first.on_trial_result(None, bad, {"epoch": 1, "val_miou": 0.1}) == STOP
    second = pickle.loads(pickle.dumps(first))  # as unpickled from tuner.pkl: reads the file
    assert second.on_trial_result(None, bad, {"epoch": 1, "val_miou": 0.1}) == STOP
    assert second.recorded()[1] == {"good": 0.9, "bad": 0.1}
    assert "2 recorded" in second.debug_string()


def test_search_runs_rungs_reach_a_resumed_search_on_a_new_head(tmp_path, monkeypatch):
    """`search.run`'s scheduler keeps its rungs in a driver file, which a search resumed on
    another head (its driver folder fetched from shared storage) reads back into the copy
    Tune unpickles from tuner.pkl, pickled when the search began. Guards against a scheduler
    built without its state path (the rungs then die with the first head) and against the
    state file missing from the driver files that are uploaded."""
    from marsseg.config import TrainConfig
    from search.experiment import Experiment, SearchSettings
    from search.storage import Storage
    from search.tuner import _scheduler

    storage = Storage(str(tmp_path / "shared"), shared=True)
    settings = SearchSettings(max_epochs=9, grace_period=1, reduction_factor=3)
    for head in ("head-a", "head-b"):
        (tmp_path / head).mkdir()
    monkeypatch.chdir(tmp_path / "head-a")
    experiment = Experiment.new(storage, "r", TrainConfig(), settings)
    scheduler = _scheduler(experiment)
    at_start = pickle.dumps(scheduler)  # what Tune saves in tuner.pkl
    good, bad, late = FakeTrial("good"), FakeTrial("bad"), FakeTrial("late")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"epoch": 1, "val_miou": 0.9}) == CONTINUE
    assert scheduler.on_trial_result(None, bad, {"epoch": 1, "val_miou": 0.1}) == STOP
    experiment.sync()  # as the searcher does whenever Tune saves the experiment

    monkeypatch.chdir(tmp_path / "head-b")  # the first head is gone; this one starts empty
    Experiment.resume(storage, "r")
    resumed = pickle.loads(at_start)
    for trial in (good, bad, late):
        resumed.on_trial_add(None, trial)
    assert resumed.recorded()[1] == {"good": 0.9, "bad": 0.1}
    # Below the rung's cutoff (2/3 of the way from 0.1 to 0.9): an empty rung would keep it.
    assert resumed.on_trial_result(None, late, {"epoch": 1, "val_miou": 0.5}) == STOP
    assert resumed.on_trial_result(None, bad, {"epoch": 2, "val_miou": 0.2}) == STOP


def test_memory_only_and_pickling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheduler = resumable("max", 9, 1, 3)
    run_stream([scheduler], max_t=9)
    assert list(tmp_path.iterdir()) == []
    copy = pickle.loads(pickle.dumps(scheduler))  # without a file, the state travels in memory
    assert scheduler.recorded()[1] and repr(copy.recorded()) == repr(scheduler.recorded())
    other = resumable("max", 27, 1, 3, tmp_path / ASHA_STATE)
    other.on_trial_add(None, FakeTrial("a"))
    other.on_trial_result(None, FakeTrial("a"), {"epoch": 1, "val_miou": 0.5})
    with pytest.raises(ValueError, match="belongs to another search"):
        resumable("max", 9, 1, 3, tmp_path / ASHA_STATE).on_trial_add(None, FakeTrial("a"))


# --- End to end through Tune ---------------------------------------------------------------

E2E_MAX_T, E2E_RF = 9, 2
# Curve c is E2E_START[c] + E2E_RISE[c] * log(epoch): trials run in this order, one at a time,
# and the order is such that rungs emptied at any point of the middle third change what is stopped.
E2E_START = [0.62, 0.74, 0.8, 0.94, 0.74, 0.92, 0.03, 0.47, 0.94]
E2E_RISE = [0.19, 0.27, 0.03, 0.14, 0.07, 0.16, 0.17, 0.0, 0.07]
E2E_CURVES = len(E2E_START)


def e2e_curve(curve_id: int, epoch: int) -> float:
    return round(E2E_START[curve_id] + E2E_RISE[curve_id] * math.log(epoch), 6)


def e2e_trainable(config: dict) -> None:
    """Reports `e2e_curve(config["curve"], epoch)` with a checkpoint each epoch; resumes."""
    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = int(Path(folder, "epoch").read_text())
    for epoch in range(start + 1, E2E_MAX_T + 1):
        time.sleep(0.02)
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "epoch").write_text(str(epoch))
            tune.report(
                {"epoch": epoch, "val_miou": e2e_curve(config["curve"], epoch)},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )


def _interrupt_after_callback():
    from ray import tune

    class InterruptAfter(tune.Callback):
        """Sends this process the signal Tune ends a run on (as Ctrl-C does) once, after the
        n-th result; the marker file keeps a restored copy of the callback from sending it."""

        def __init__(self, n: int, marker: Path):
            self.n, self.marker, self.seen = n, marker, 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.seen += 1
            if self.seen == self.n and not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGUSR1)

    return InterruptAfter


def _stopped_epochs(results) -> dict[int, int]:
    """Curve id -> epoch reached, for the trials stopped before max_t."""
    out = {}
    for result in results:
        assert result.error is None, result.error
        epoch = result.metrics["epoch"]
        if epoch < E2E_MAX_T:
            out[result.config["curve"]] = epoch
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resumable", "stock"])
def test_resumed_tune_run_stops_what_the_uninterrupted_one_does(kind, ray_env, tmp_path):
    import ray
    from ray import tune

    def tuner(name: str, callbacks=()) -> tune.Tuner:
        return tune.Tuner(
            e2e_trainable,
            param_space={"curve": tune.grid_search(list(range(E2E_CURVES)))},
            tune_config=tune.TuneConfig(
                scheduler=(
                    resumable("max", E2E_MAX_T, 1, E2E_RF, tmp_path / name / ASHA_STATE)
                    if kind == "resumable"
                    else ray_asha("max", E2E_MAX_T, 1, E2E_RF)
                ),
                max_concurrent_trials=1,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(tmp_path), callbacks=list(callbacks), verbose=0
            ),
        )

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        began = time.monotonic()
        whole = tuner("whole").fit()
        uninterrupted = _stopped_epochs(whole)
        n_results = sum(len(r.metrics_dataframe) for r in whole)

        interrupt = _interrupt_after_callback()(n_results // 2, tmp_path / "interrupted")
        part = tuner("parts", [interrupt]).fit()
        finished = [r for r in part if r.metrics and r.metrics.get("done")]
        assert 0 < len(finished) < E2E_CURVES, "the run should have been cut in the middle"
        state = tmp_path / "parts" / ASHA_STATE
        rungs = (
            [len(r["recorded"]) for r in json.loads(state.read_text())["rungs"]]
            if state.exists()
            else None
        )

        restored = tune.Tuner.restore(
            str(tmp_path / "parts"), trainable=e2e_trainable, resume_errored=True
        ).fit()
        resumed = _stopped_epochs(restored)
        took = time.monotonic() - began
    finally:
        ray.shutdown()

    print(f"\n{kind}: uninterrupted ({n_results} results): stopped {uninterrupted}")
    print(f"{kind}: interrupted after {n_results // 2} results (rungs {rungs}), then resumed:")
    print(f"{kind}:   stopped {resumed}  ({took:.0f} s for the three runs)")
    assert uninterrupted, "the curves should make ASHA stop some trials"
    if kind == "resumable":
        assert resumed == uninterrupted
    else:  # the bug: Tune resumes Ray's ASHAScheduler with empty rungs
        assert resumed != uninterrupted
    assert len(restored) == E2E_CURVES
