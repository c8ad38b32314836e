"""One driver per experiment: a lock file in the experiment's driver folder, held for the run.

Two drivers on one experiment (a second terminal, a retried `ray submit`) would ask and tell
one Optuna study twice and write each other's leaderboard and Tune state. So `search.run` takes
`driver.lock` (beside the study) before it touches the experiment and removes it when it exits,
on an error or Ctrl-C too. The lock is created with `O_CREAT | O_EXCL`, which succeeds for one
process only, and holds a JSON object naming its driver: `host`, `pid`, `started` (Unix time)
and a random `token` (so a driver removes only its own lock).

A lock whose driver is gone is stale and is taken over, with one line saying so:
- on this host: its PID no longer runs, or runs a process that started after the lock (a
  reused PID);
- on another host (a driver folder on a shared filesystem): this host cannot see that driver,
  so the lock is refused unless `--break-lock` says it is gone;
- unreadable (a driver killed between creating and writing it): older than `UNREADABLE_S`.
Two drivers taking over one stale lock in the same instant is not guarded against.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from marsseg.errors import SearchError

UNREADABLE_S = 30.0
"""An unreadable lock older than this is stale (a driver writes it right after creating it)."""


@dataclass(frozen=True)
class LockOwner:
    """The driver a lock names."""

    host: str
    pid: int
    started: float
    token: str

    @classmethod
    def me(cls) -> LockOwner:
        return cls(socket.gethostname(), os.getpid(), time.time(), secrets.token_hex(8))

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} since {since}"

    def gone(self) -> bool | None:
        """Whether the driver no longer runs (None: on another host, so unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it runs, as another user
        return _started_after(self.pid, self.started)


def _started_after(pid: int, since: float) -> bool:
    """Whether process `pid` started after `since` (its PID was reused); False when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return started > since + 1  # btime and clock ticks are whole seconds apart at worst


def read_lock(path: Path) -> LockOwner | None:
    """The driver a lock file names; None when unreadable (or gone: see `path.exists()`)."""
    try:
        return LockOwner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class DriverLock:
    """`with DriverLock(folder / "driver.lock", "name"):` holds the experiment for the block."""

    def __init__(self, path: Path, name: str, break_lock: bool = False) -> None:
        self.path = Path(path)
        self.name = name
        self.break_lock = break_lock
        self.owner = LockOwner.me()
        self.created_folders: list[Path] = []

    def __enter__(self) -> DriverLock:
        folder = self.path.parent  # and the storage above it, on a first search there
        self.created_folders = [f for f in (folder, *folder.parents) if not f.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                return self
            self._take_over_if_stale()
        raise SearchError(f"experiment {self.name}: another driver keeps taking {self.path}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        held = read_lock(self.path)
        if held is not None and held.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        for folder in self.created_folders:  # deepest first, each only when empty: a start
            with contextlib.suppress(OSError):  # that left nothing behind leaves no folder
                folder.rmdir()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.owner)))
        return True

    def _take_over_if_stale(self) -> None:
        """Remove a stale lock, saying so in one line; refuse a live (or unknown) one."""
        text = _text(self.path)
        if text is None:
            return  # released meanwhile: try again
        holder = read_lock(self.path)
        why = self._stale_because(holder)
        print(f"lock: taking over {self.path}: {why}")
        if _text(self.path) == text:  # not taken by another driver since it was read
            self.path.unlink(missing_ok=True)

    def _stale_because(self, holder: LockOwner | None) -> str:
        """Why the lock held by `holder` is stale; a SearchError when it is not."""
        if holder is None:
            age = time.time() - self.path.stat().st_mtime
            if age > UNREADABLE_S:
                return f"it is unreadable and {age:.0f} s old"
            raise SearchError(f"experiment {self.name} is being started by another driver")
        gone = holder.gone()
        if gone:
            return f"its driver ({holder.describe()}) is gone"
        if gone is None and self.break_lock:
            return f"--break-lock (its driver was {holder.describe()})"
        hint = "wait for it or stop it" if gone is False else "if it is gone, pass --break-lock"
        raise SearchError(
            f"experiment {self.name} is being run by {holder.describe()} (lock {self.path}); {hint}"
        )


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
