"""Bad input through every entry point: one line `error: ...`, exit 2, no traceback and no
partial output, for each fault class (unwritable or full outputs, bad config values, devices this
machine lacks, damaged model files, bad flags and archives).

Every case runs in-process through `run_cli` and fails before any training: the training and
Ray entries of the stages are replaced by functions that fail the test if reached.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import Case, Place, check_case, never

import marsseg.data.__main__ as data_cli
import marsseg.train.__main__ as train_cli
from marsseg.cli import run_cli
from search import compare, export
from search import final as final_stage
from search import predict as predict_stage
from search import run as search_run

NO_SPACE = "No space left on device"


def _enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, NO_SPACE)


def _broken_lr(state: dict) -> None:
    state["config"]["optim"]["lr"] = "fast"


def _wider(state: dict) -> None:
    state["config"]["model"]["knobs"]["base_channels"] = 16


def _existing(place: Place, name: str, text: str = "earlier submission\n") -> Path:
    path = place.root / name
    path.write_text(text)
    return path


def _truncated(place: Place) -> Path:
    path = place.root / "truncated.pt"
    data = place.model.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(place: Place) -> Path:
    path = place.root / "garbage.pt"
    path.write_bytes(b"this is not a model file\n" * 10)
    return path


# Each case: (place, monkeypatch) -> Case. The monkeypatch simulates what cannot be staged with
# files: a full disk, a machine without CUDA.
CASES: dict[str, Callable[[Place, pytest.MonkeyPatch], Case]] = {}


def case(name: str):
    def register(build: Callable[[Place, pytest.MonkeyPatch], Case]):
        CASES[name] = build
        return build

    return register


# --- marsseg.train --------------------------------------------------------------------------


@case("train: --out under a file")
def _(p, mp):
    return Case(train_cli.main, ["--out", str(p.blocker / "run")], f"lies under {p.blocker}")


@case("train: config optim.lr is a string")
def _(p, mp):
    config = p.yaml("fast.yaml", "optim:\n  lr: fast\n")
    out = p.root / "run"
    return Case(
        train_cli.main,
        ["--config", str(config), "--out", str(out)],
        "optim.lr must be a number",
        absent=[out],
    )


@case("train: config batch_size is a list")
def _(p, mp):
    config = p.config("list.yaml", batch_size="[32, 64]")
    out = p.root / "run"
    return Case(
        train_cli.main,
        ["--config", str(config), "--out", str(out)],
        "batch_size must be an integer, got [32, 64]",
        absent=[out],
    )


@case("train: config file is not text")
def _(p, mp):
    config = p.root / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00\x01 not text")
    out = p.root / "run"
    return Case(
        train_cli.main,
        ["--config", str(config), "--out", str(out)],
        "binary.yaml: not valid YAML",
        absent=[out],
    )


@case("train: --device cuda without CUDA")
def _(p, mp):
    mp.setattr(torch.cuda, "is_available", lambda: False)
    out = p.root / "run"
    argv = ["--data", str(p.archive), "--device", "cuda", "--out", str(out)]
    return Case(
        train_cli.main,
        argv,
        "--device cuda: CUDA is not available on this machine",
        absent=[out],
    )


@case("train: --device tpu")
def _(p, mp):
    out = p.root / "run"
    argv = ["--data", str(p.archive), "--device", "tpu", "--out", str(out)]
    return Case(train_cli.main, argv, "--device tpu: not a device name", absent=[out])


@case("train: disk full writing config.yaml with the first epoch")
def _(p, mp):
    def one_epoch(config, archive, *, on_epoch, **_):
        metrics = {"epoch": 1, "train_loss": 1.0, "lr": 1e-3, "epoch_time_s": 1.0}
        on_epoch({**metrics, "stop_reason": ""}, None)

    out = p.root / "run"
    argv = ["--config", str(p.config("c.yaml")), "--data", str(p.archive), "--out", str(out)]
    mp.setattr(train_cli, "fit", one_epoch)
    mp.setattr(Path, "write_text", _enospc)
    return Case(train_cli.main, argv, f"{NO_SPACE}: {out / 'config.yaml'}", absent=[out])


# --- search.final ---------------------------------------------------------------------------


@case("final: --out under a file")
def _(p, mp):
    argv = ["--config", str(p.config("c.yaml")), "--out", str(p.blocker / "final")]
    return Case(final_stage.main, argv, f"output folder {p.blocker / 'final'} lies under")


@case("final: --out in /proc")
def _(p, mp):
    argv = ["--config", str(p.config("c.yaml")), "--out", "/proc/marsseg-final"]
    return Case(final_stage.main, argv, "output folder /proc/marsseg-final is not writable")


@case("final: --device cuda without CUDA")
def _(p, mp):
    mp.setattr(torch.cuda, "is_available", lambda: False)
    out = p.root / "final"
    argv = ["--config", str(p.config("c.yaml")), "--out", str(out), "--device", "cuda"]
    return Case(final_stage.main, argv, "CUDA is not available", absent=[out])


@case("final: config optim.lr is a list")
def _(p, mp):
    config = p.yaml("lr.yaml", "optim:\n  lr: [0.1, 0.2]\n")
    out = p.root / "final"
    return Case(
        final_stage.main,
        ["--config", str(config), "--out", str(out)],
        "lr.yaml: optim.lr must be a number, got [0.1, 0.2]",
        absent=[out],
    )


# --- search.predict -------------------------------------------------------------------------


def _predict(p: Place, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(p.archive), "--out", str(out), *extra]


@case("predict: garbage model file")
def _(p, mp):
    out = p.root / "sub.csv"
    return Case(
        predict_stage.main,
        _predict(p, _garbage(p), out),
        "garbage.pt is not a readable model file",
        absent=[out],
    )


@case("predict: truncated model file, existing submission kept")
def _(p, mp):
    out = _existing(p, "sub.csv")
    return Case(
        predict_stage.main,
        _predict(p, _truncated(p), out, "--force"),
        "truncated.pt is not a readable model file",
        kept=[out],
    )


@case("predict: model file whose config is broken")
def _(p, mp):
    out = p.root / "sub.csv"
    model = p.damaged_model("broken.pt", _broken_lr)
    return Case(
        predict_stage.main,
        _predict(p, model, out),
        "broken.pt: its config is broken: optim.lr must be a number, got 'fast'",
        absent=[out],
    )


@case("predict: model weights that do not fit its config")
def _(p, mp):
    out = p.root / "sub.csv"
    model = p.damaged_model("wider.pt", _wider)
    return Case(
        predict_stage.main,
        _predict(p, model, out),
        "wider.pt: member 1's weights do not fit its config's unet",
        absent=[out],
    )


@case("predict: --device cuda:7 on a one-GPU machine")
def _(p, mp):
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: 1)
    out = p.root / "sub.csv"
    return Case(
        predict_stage.main,
        _predict(p, p.model, out, "--device", "cuda:7"),
        "--device cuda:7: this machine has 1 CUDA device(s); available: cpu, cuda, cuda:0",
        absent=[out],
    )


@case("predict: --out under a file")
def _(p, mp):
    out = p.blocker / "sub.csv"
    return Case(predict_stage.main, _predict(p, p.model, out), "submission folder")


@case("predict: too little free space")
def _(p, mp):
    real = shutil.disk_usage
    mp.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    out = p.root / "sub.csv"
    return Case(
        predict_stage.main,
        _predict(p, p.model, out),
        f"not enough free space for submission {out}",
        absent=[out],
    )


@case("predict: disk full while writing the submission")
def _(p, mp):
    mp.setattr("os.fsync", _enospc)
    out = _existing(p, "sub.csv")
    return Case(
        predict_stage.main,
        _predict(p, p.model, out, "--force", "--device", "cpu"),
        f"error: {NO_SPACE}: {out}",
        kept=[out],
    )


# --- search.export, search.compare, search.run ----------------------------------------------


@case("export: --out under a file")
def _(p, mp):
    out = p.blocker / "configs"
    argv = [str(p.root / "experiments" / "x"), "--out", str(out)]
    return Case(export.main, argv, f"output folder {out} lies under")


@case("compare: --out under a file")
def _(p, mp):
    argv = ["--candidate", "a=preset:plain", "--epochs", "1", "--out", str(p.blocker / "cmp")]
    return Case(compare.main, argv, "lies under")


@case("compare: candidate config with a string batch size")
def _(p, mp):
    config = p.config("big.yaml", batch_size="big")
    out = p.root / "cmp"
    argv = ["--candidate", f"a={config}", "--epochs", "1", "--out", str(out)]
    return Case(compare.main, argv, "batch_size must be an integer, got 'big'", absent=[out])


@case("run: --config with a word where a number goes")
def _(p, mp):
    config = p.yaml("search.yaml", "num-samples: many\n")
    return Case(
        search_run.main,
        ["--config", str(config)],
        "argument --num-samples: must be an integer >= 1, got 'many'",
    )


@case("run: --config with a string for a switch")
def _(p, mp):
    config = p.yaml("search.yaml", "no-reference-trial: 'no'\n")
    return Case(
        search_run.main, ["--config", str(config)], "no-reference-trial must be true or false"
    )


@case("run: --config with a list for a name")
def _(p, mp):
    config = p.yaml("search.yaml", "space: [default, marsseg]\n")
    return Case(search_run.main, ["--config", str(config)], "space must be a single value")


@case("run: --train-config with a negative learning rate")
def _(p, mp):
    storage = p.root / "experiments"
    storage.mkdir()
    config = p.yaml("base.yaml", "optim:\n  lr: -1\n")
    argv = ["--train-config", str(config), "--storage", str(storage), "--name", "x"]
    return Case(
        search_run.main,
        [*argv, "--data", str(p.archive)],
        "optim.lr must be > 0, got -1",
        absent=[storage / "x"],
    )


# --- marsseg.data ---------------------------------------------------------------------------


@case("data synth: --out in /proc")
def _(p, mp):
    return Case(
        data_cli.main,
        ["synth", "--out", "/proc/marsseg.npz", "--n-train", "8", "--n-test", "1"],
        "archive folder /proc is not writable",
    )


@case("data synth: disk full while writing the archive")
def _(p, mp):
    mp.setattr(np, "savez", _enospc)
    out = p.root / "new" / "mars.npz"
    argv = ["synth", "--out", str(out), "--n-train", "8", "--n-test", "1"]
    return Case(data_cli.main, argv, f"error: {NO_SPACE}: {out}", absent=[p.root / "new"])


@case("data synth: --n-train 0")
def _(p, mp):
    out = p.root / "mars.npz"
    argv = ["synth", "--out", str(out), "--n-train", "0"]
    return Case(
        data_cli.main, argv, "argument --n-train: must be an integer >= 1, got 0", absent=[out]
    )


@case("data inspect: not an archive")
def _(p, mp):
    bad = p.yaml("bad.npz", "junk")
    out = p.root / "figures"
    argv = ["inspect", str(bad), "--out", str(out)]
    return Case(data_cli.main, argv, "bad.npz is not a NumPy .npz archive", absent=[out])


@case("data inspect: --out under a file")
def _(p, mp):
    argv = ["inspect", str(p.archive), "--out", str(p.blocker / "figures")]
    return Case(data_cli.main, argv, "lies under")


# --- the runner -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_no_output(name, place, monkeypatch, capsys):
    check_case(CASES[name](place, monkeypatch), place, monkeypatch, capsys)


def test_enough_cases_across_entry_points_and_fault_classes():
    prefixes = {name.split(":")[0].split()[0] for name in CASES}
    assert {"train", "final", "predict", "export", "compare", "run", "data"} <= prefixes
    assert len(CASES) >= 15


def test_final_refuses_an_unwritable_out_before_loading_data_or_training(
    place, monkeypatch, capsys
):
    """The issue's case: a 5-fold ensemble must not train for hours, then fail to write."""
    monkeypatch.setattr(final_stage, "load_clean_archive", never)
    monkeypatch.setattr(final_stage, "train_final", never)
    out = place.blocker / "final"
    argv = ["--config", str(place.config("c.yaml")), "--folds", "5", "--out", str(out)]
    start = time.perf_counter()
    assert run_cli(final_stage.main, argv) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert err == f"error: output folder {out} lies under {place.blocker}, a file"


def test_a_project_bug_keeps_its_traceback(monkeypatch):
    """Only the user-facing fault classes become one line."""

    def buggy(argv):
        raise TypeError("a bug in the project")

    with pytest.raises(TypeError, match="a bug in the project"):
        run_cli(buggy, [])
