"""Where the project keeps files it can rebuild: the synthetic archive and offline augmentations."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MARSSEG_CACHE, or ~/.cache/marsseg: shared by every run and trial on one machine."""
    return Path(os.environ.get("MARSSEG_CACHE", Path.home() / ".cache" / "marsseg"))
