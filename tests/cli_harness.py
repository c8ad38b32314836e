"""What the bad-input tests share (`test_cli_errors`, `test_cli_faults`): a case, the files it
may point at, and the check that it failed as a user's mistake should. The `place` fixture
(conftest.py) builds a `Place` with the stages' training and Ray entries replaced by `never`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from marsseg.cli import run_cli
from marsseg.config import TrainConfig

TINY = {"model": {"name": "unet", "knobs": {"depth": 2, "base_channels": 8}}, "batch_size": 4}


@dataclass
class Place:
    """The files a case may point at, in a fresh folder per case."""

    root: Path
    archive: Path
    model: Path
    blocker: Path
    """A regular file: any path under it is unwritable, even for root."""

    def yaml(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def config(self, name: str, **changes: object) -> Path:
        """A valid tiny config file with top-level `changes` (spliced in as YAML text)."""
        path = TrainConfig.from_dict(TINY).save(self.root / name)
        if changes:
            text = "".join(f"{k}: {v}\n" for k, v in changes.items())
            lines = [
                line
                for line in path.read_text().splitlines(keepends=True)
                if line.split(":")[0] not in changes
            ]
            path.write_text("".join(lines) + text)
        return path

    def damaged_model(self, name: str, edit: Callable[[dict], None]) -> Path:
        state = torch.load(self.model, weights_only=True)
        edit(state)
        torch.save(state, self.root / name)
        return self.root / name


@dataclass
class Case:
    main: Callable
    argv: list[str]
    expected: str
    absent: list[Path] = field(default_factory=list)
    """Outputs that must not exist afterwards."""
    kept: list[Path] = field(default_factory=list)
    """Existing files that must be byte-for-byte unchanged afterwards."""


def never(*_: object, **__: object) -> None:
    raise AssertionError("a bad-input case reached training or Ray")


def snapshot(root: Path) -> set[Path]:
    return {path.relative_to(root) for path in root.rglob("*")}


def check_case(built: Case, place: Place, monkeypatch, capsys) -> None:
    """Run a case: exit 2, one line `error: ...` holding the expected text, no traceback, the
    outputs named absent, the kept files unchanged and nothing new under the case's folder."""
    kept_before = {path: path.read_bytes() for path in built.kept}
    before = snapshot(place.root)
    assert run_cli(built.main, built.argv) == 2
    monkeypatch.undo()  # before any assertion reads files with a patched write
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert built.expected in lines[0], lines[0]
    assert ".tmp" not in lines[0] and "write-probe" not in lines[0], lines[0]
    for path in built.absent:
        assert not path.exists(), f"{path} was written"
    for path, content in kept_before.items():
        assert path.read_bytes() == content, f"{path} changed"
    # Nothing else appeared either: no temporary file, probe or half-made folder.
    assert snapshot(place.root) == before
