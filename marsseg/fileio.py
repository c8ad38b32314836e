"""Output files: checked before the work that fills them, then written atomically.

`check_writable` and `check_output` refuse an output folder or file that cannot be written
(an unwritable or read-only place, a path under a regular file, too little free space) before
any expensive work, without creating anything. `atomic_path` writes so that a reader or a crash
never sees a half-written archive, checkpoint or CSV, and names the user's path, not its
temporary file, when the write fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from marsseg.errors import OutputError

MB = 1 << 20


def _existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, or the nearest folder above it that does."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()  # unreachable for a resolved path: the root exists


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse an output folder that cannot be written or created, without creating it.

    The folder either exists and is a writable folder, or the nearest existing folder above it
    lets this process create entries (the missing folders are created later, when writing).
    Permission is probed by creating and removing a temporary folder there: `os.access` says
    yes to root even where writing fails.
    """
    folder = Path(folder).expanduser()
    resolved = folder.resolve()
    base = _existing_ancestor(resolved)
    if not base.is_dir():
        where = "is a file, not a folder" if base == resolved else f"lies under {base}, a file"
        raise OutputError(f"{what} {folder} {where}")
    try:
        probe = tempfile.mkdtemp(prefix=".marsseg-write-probe-", dir=base)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(
            f"{what} {folder} is not writable (cannot create anything in {base}: {reason})"
        ) from None
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return folder


def check_output(path: str | os.PathLike, need_bytes: int = 0, what: str = "output") -> Path:
    """Refuse an output file that cannot be written: a folder in its place, a folder that cannot
    be written or created, or fewer than `need_bytes` free on its disk (a rough lower bound on
    the file's size; 0 skips the space check)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder, not a file")
    check_writable(path.parent, what=f"{what} folder")
    if need_bytes > 0:
        free = shutil.disk_usage(_existing_ancestor(path.resolve())).free
        if free < need_bytes:
            raise OutputError(
                f"not enough free space for {what} {path}: {free / MB:.1f} MB free, "
                f"at least {need_bytes / MB:.1f} MB needed"
            )
    return path


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an `OSError` (with an errno: disk full, permission denied, ...) as the same
    kind of error naming `path`: a write through a temporary file must blame the user's file."""
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on success move it over `path` in one step.

    On any failure, KeyboardInterrupt included, the temporary file is removed, the folders
    created for it are removed again (when still empty) and a file already at `path` is left
    as it was; an `OSError` names `path`, not the temporary file. The temporary file sits in
    the same folder, so the final `os.replace` is an atomic rename on one filesystem.
    """
    target = Path(path)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    done = False
    try:
        with naming(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield temp
            os.replace(temp, target)
        done = True
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        if not done:
            for folder in created:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
