"""search.timeline without Ray: the callback's record, its state across a resume, the summary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from search.experiment import TIMELINE
from search.timeline import Timeline, read_timeline, summarise_timeline, trial_results


def _row(session, event, t, trial="", **values):
    return {"session": session, "event": event, "trial": trial, "t_s": t, **values}


def _result(session, trial, t, epoch, epoch_time, **values):
    return _row(session, "result", t, trial, epoch=epoch, epoch_time_s=epoch_time, **values)


def test_summary_of_two_slots():
    rows = [
        _row(0, "begin", 0.0, slots=2),
        _row(0, "start", 1.0, "a"),
        _row(0, "start", 2.0, "b"),
        _result(0, "a", 5.0, 1, 3.0, setup_s=0.5, score=0.1),  # start latency 1.0
        _result(0, "b", 6.0, 1, 3.5, setup_s=0.2, score=0.3),  # start latency 0.5
        _result(0, "a", 8.5, 2, 3.0, report_prep_s=0.1, score=0.2),  # gap overhead 0.5
        _row(0, "stop", 8.6, "a"),
        _row(0, "end", 10.0),
    ]
    s = summarise_timeline(rows)
    assert (s.trials, s.epochs, s.slots, s.wall_s, s.allotted_s) == (2, 3, 2, 10.0, 20.0)
    assert s.train_s == pytest.approx(9.5)
    assert s.start_latency_s == pytest.approx([1.0, 0.5])
    assert s.setup_s == pytest.approx([0.5, 0.2])
    assert s.report_overhead_s == pytest.approx([0.5])
    assert s.report_prep_s == pytest.approx([0.1])
    assert s.idle_share == pytest.approx(1 - 9.5 / 20)
    assert s.start_share == pytest.approx(1.5 / 20) and s.report_share == pytest.approx(0.5 / 20)
    assert s.between_share == pytest.approx(s.idle_share - 2 / 20)
    line = s.line()
    assert line.startswith("timeline: 2 trials, 3 epochs in 10 s on 2 slot(s)")
    assert "slots idle 52.5%" in line and "\n" not in line
    assert s.row()["idle_pct"] == pytest.approx(52.5)
    assert trial_results(rows) == [(5.0, "a", 0.1), (6.0, "b", 0.3), (8.5, "a", 0.2)]


def test_a_restarted_trial_counts_a_new_start_not_a_gap():
    rows = [
        _row(0, "begin", 0.0, slots=1),
        _row(0, "start", 0.0, "a"),
        _result(0, "a", 2.0, 1, 1.5),
        _row(0, "end", 3.0),
        _row(1, "begin", 100.0, slots=1),  # resumed later: the pause is not search time
        _row(1, "start", 101.0, "a"),
        _result(1, "a", 104.0, 2, 2.0),
        _row(1, "end", 105.0),
    ]
    s = summarise_timeline(rows)
    assert (s.wall_s, s.allotted_s, s.epochs) == (8.0, 8.0, 2)
    assert s.start_latency_s == pytest.approx([0.5, 1.0]) and s.report_overhead_s == []


def test_callback_records_events_and_keeps_them_across_a_resume(tmp_path):
    trial = SimpleNamespace(trial_id="t1")
    first = Timeline(tmp_path, slots=2)
    first.setup()
    first.on_trial_start(0, [], trial)
    result = {"epoch": 1, "epoch_time_s": 0.01, "setup_s": 0.0, "val_miou": 0.25}
    first.on_trial_result(0, [], trial, result)
    state = first.get_state()

    resumed = Timeline(tmp_path, slots=2)  # as Tune unpickles it from the experiment
    resumed.set_state(state)
    resumed.setup()
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_result(0, [], trial, {**result, "epoch": 2})
    resumed.on_trial_complete(0, [], trial)
    resumed.on_experiment_end([])

    rows = read_timeline(tmp_path / TIMELINE)
    assert [(r["session"], r["event"]) for r in rows] == [
        (0, "begin"),
        (0, "start"),
        (0, "result"),
        (1, "begin"),
        (1, "start"),
        (1, "result"),
        (1, "stop"),
        (1, "end"),
    ]
    assert [r["t_s"] for r in rows] == sorted(r["t_s"] for r in rows)
    assert rows[2]["score"] == 0.25 and rows[2]["report_prep_s"] is None
    assert summarise_timeline(rows).epochs == 2
