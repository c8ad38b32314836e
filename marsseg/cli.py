"""Shared plumbing for the `python -m ...` entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from marsseg.errors import MarsSegError


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main`; a user-facing fault becomes one line `error: ...` on stderr and exit code 2.

    The faults: a `MarsSegError` (bad input: an archive, a config file, a model file, a flag, a
    device, an output path) and an `OSError` (a missing file, a full disk, permission denied, a
    read-only filesystem), named by what failed and the path. Anything else is a bug in the
    project and keeps its traceback.
    """
    try:
        return main(argv) or 0
    except MarsSegError as err:
        print(f"error: {err}", file=sys.stderr)
    except FileNotFoundError as err:
        print(f"error: file not found: {err.filename or err}", file=sys.stderr)
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 2


def describe_os_error(err: OSError) -> str:
    """`<what failed>: <path>` (and the second path of a rename), on one line."""
    what = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    text = ": ".join([what, " -> ".join(paths)] if paths else [what])
    return " ".join(text.split())  # one line whatever the message held


def add_decoding_flags(
    parser: argparse.ArgumentParser, force_help: str = "overwrite an existing submission"
) -> None:
    """`--no-tta`, `--no-metric-aware`, `--force` and `--device`, as every predicting entry point
    spells them."""
    parser.add_argument("--no-tta", action="store_true", help="no horizontal-flip TTA")
    parser.add_argument(
        "--no-metric-aware", action="store_true", help="let the argmax pick class 0 too"
    )
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def command(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[], int]:
    """The console script (`[project.scripts]` in pyproject) of an entry point's `main`."""

    def script() -> int:
        return run_cli(main)

    script.__doc__ = main.__doc__
    return script


def program(module: str, script: str) -> str:
    """The name `--help` shows: the console script when run as one, else `python -m module`."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def add_max_epochs_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """`--max-epochs N` (the config field it sets), also spelt `--epochs` as it used to be."""
    parser.add_argument(
        "--max-epochs", "--epochs", dest="max_epochs", type=int, metavar="N", help=help
    )


def add_cpus_flag(parser: argparse.ArgumentParser, help: str, default: float | None = None) -> None:
    """`--cpus-per-trial N`: CPUs (torch threads) of each training run, in every entry point
    that trains; `--threads`, its old spelling in the non-Ray ones, still works."""
    parser.add_argument(
        "--cpus-per-trial",
        "--threads",
        dest="cpus_per_trial",
        type=float,
        metavar="N",
        default=default,
        help=help,
    )


def torch_threads(cpus: float | None) -> int | None:
    """Torch threads for a run granted `cpus` CPUs: at least one for a fraction, torch's own
    default (None) when none was asked for."""
    return None if cpus is None else max(1, int(cpus))
