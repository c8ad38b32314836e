"""Atomic file writes: a reader or a crash never sees a half-written archive, checkpoint or CSV."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on success move it over `path` in one step.

    On any failure, KeyboardInterrupt included, the temporary file is removed and a file already
    at `path` is left as it was. The temporary file sits in the same folder, so the final
    `os.replace` is an atomic rename on one filesystem.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield temp
        os.replace(temp, target)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
