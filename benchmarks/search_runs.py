"""What the search benchmarks share: running `search.run` in this process and reading back
the timeline it wrote, so every figure comes from the search's own record of its events."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from search.experiment import TIMELINE, Experiment
from search.run import main as search_main
from search.timeline import read_timeline


def device() -> torch.device | None:
    """The device the trials train on (a local Ray gives them the GPU when there is one)."""
    return torch.device("cuda") if torch.cuda.is_available() else None


@contextlib.contextmanager
def search_storage(storage: Path | None) -> Iterator[Path]:
    """`storage`, or a temporary folder removed afterwards; Ray is shut down on the way out.

    One Ray serves every search of a benchmark, so its start-up is paid once and is not
    counted in any search's timeline.
    """
    try:
        if storage is not None:
            storage.mkdir(parents=True, exist_ok=True)
            yield storage
        else:
            with tempfile.TemporaryDirectory(prefix="marsseg-bench-") as folder:
                yield Path(folder)
    finally:
        ray.shutdown()


def run_search(flags: Sequence[str], storage: Path, label: str) -> list[dict[str, Any]]:
    """Run one search with `flags` under a fresh name in `storage`; return its timeline rows."""
    name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    search_main([*flags, "--storage", str(storage), "--name", name])
    return read_timeline(Experiment.at(str(storage / name)).driver / TIMELINE)
