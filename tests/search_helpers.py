"""What the search tests share: a fast space, the Ray environment and the search's flags."""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).parent
SPACE = "search_space:space"  # tests/search_space.py: small enough for CPU tests
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_AUTH_MODE": "disabled",  # no token written under ~/.ray
    # Ray restores a searcher (and a subprocess imports the space) by module name.
    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
}


def search_args(
    archive: Path, storage: Path, name: str, samples: int = 8, space: str = SPACE, epochs: int = 3
) -> list[str]:
    """Flags of a small search: a few trials of a tiny model, two at a time."""
    return [
        *("--space", space, "--data", str(archive), "--storage", str(storage), "--name", name),
        *("--num-samples", str(samples), "--max-epochs", str(epochs), "--grace-period", "1"),
        *("--reduction-factor", "2", "--max-concurrent", "2", "--seed", "0"),
    ]
