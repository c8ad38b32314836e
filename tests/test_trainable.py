"""The trial's own files, without running Ray: panel event files and the resume candidates."""

from __future__ import annotations

import io
import shutil

import numpy as np
import torch
from PIL import Image
from ray import tune
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

from search.trainable import CHECKPOINT_FILE, PANEL_TAG, downloaded, resume_candidates, write_panel


def test_a_panel_is_complete_on_disk_when_write_panel_returns(tmp_path):
    """What Tune uploads right after: every event file whole, and both panels decode (two
    panels within one second must not share, and so overwrite, one file)."""
    rng = np.random.default_rng(0)
    panels = [rng.integers(0, 256, (96, 160, 3), dtype=np.uint8) for _ in range(2)]
    for step, panel in zip((1, 5), panels, strict=True):
        write_panel(tmp_path, panel, step)
        for path in tmp_path.glob("events.out.tfevents.*"):
            records = list(RawEventFileLoader(str(path)).Load())
            # A TFRecord is length (8 bytes), its CRC (4), the data and the data's CRC (4).
            assert sum(len(r) + 16 for r in records) == path.stat().st_size, path
    board = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0}).Reload()
    events = board.Images(PANEL_TAG)
    assert [e.step for e in events] == [1, 5]
    for event, panel in zip(events, panels, strict=True):
        with Image.open(io.BytesIO(event.encoded_image_string)) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), panel)


def _fake_trial(folder, indices):
    for index in indices:
        path = folder / f"checkpoint_{index:06d}"
        path.mkdir(parents=True)
        torch.save({"index": index}, path / CHECKPOINT_FILE)
        (folder / f"other_{index}").mkdir()  # not a checkpoint folder


def test_resume_candidates_are_the_latest_then_older_ones_beside_it(tmp_path, capsys):
    trial = tmp_path / "trial"
    _fake_trial(trial, [0, 2, 3, 4])
    latest = tune.Checkpoint.from_directory(str(trial / "checkpoint_000003"))
    candidates = resume_candidates(latest)
    # newest first; checkpoint_000004 is newer than what Tune knows as the latest: left out
    names = [c.path.rsplit("/", 1)[-1] for c in candidates]
    assert names == ["checkpoint_000003", "checkpoint_000002", "checkpoint_000000"]
    assert resume_candidates(None) == []

    shutil.rmtree(trial / "checkpoint_000002")  # gone from storage since it was listed
    files = downloaded(candidates, tmp_path / "down")
    first = next(files)
    assert torch.load(first, weights_only=True) == {"index": 3}
    assert not (tmp_path / "down" / "1").exists()  # nothing fetched before fit asks for it
    rest = list(files)
    assert [torch.load(p, weights_only=True) for p in rest] == [{"index": 0}]
    assert "checkpoint_000002 cannot be fetched" in capsys.readouterr().out
