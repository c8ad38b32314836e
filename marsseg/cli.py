"""Shared plumbing for the `python -m ...` entry points."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from marsseg.checks import check_number
from marsseg.errors import ConfigError, MarsSegError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes (a bad value, an unknown or missing flag) are one line,
    `error: argument --flag: ...` with exit code 2 through `run_cli`, like every other bad input,
    instead of the usage text and a second line."""

    def error(self, message: str) -> NoReturn:
        # argparse names a flag by all its spellings (`--max-epochs/--epochs`): keep the first,
        # the one --help and the README use.
        message = re.sub(r"^argument (-[\w-]+)(?:/-[\w-]+)+:", r"argument \1:", message)
        raise ConfigError(" ".join(message.split()))


def _flag_type(convert: Callable[[str], float], name: str, **rule: Any) -> Callable[[str], Any]:
    """An argparse `type` that converts the text and applies `check_number`'s rule to it."""

    def parse(text: str) -> Any:
        try:
            value: object = convert(text)
        except ValueError:
            value = text
        try:
            return check_number(value, "value", **rule)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value ")) from None

    parse.__name__ = name  # what argparse would call the type in a message
    return parse


def integer_flag(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer in [low, high]; anything else is refused, naming the flag."""
    return _flag_type(int, "integer", integer=True, low=low, high=high)


def number_flag(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """An argparse `type`: a finite number in the range (NaN and infinities refused)."""
    return _flag_type(float, "number", low=low, high=high, low_open=low_open, high_open=high_open)


SEED = integer_flag(0)
"""Seeds: numpy's generators take none below 0."""
COUNT = integer_flag(1)
"""How many of something: at least one."""
CPUS = number_flag(0, low_open=True)
"""CPUs of a run: any positive amount (a fraction packs runs on a core)."""
GPUS = number_flag(0)
"""GPUs of a run: 0 for none, a fraction packs runs on one GPU."""
WORKERS = integer_flag(0)
"""DataLoader processes: 0 loads in the training process."""
FOLDS = integer_flag(2)
"""Folds of a k-fold ensemble: two at least."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a batch scheduler, `kill` or a reclaimed spot node sends), raised where the
    program is, like Ctrl-C, so the same clean-up runs and nothing is left half-made."""


TERMINATED_EXIT = 128 + signal.SIGTERM
"""The exit status shells give a process that SIGTERM ended."""


_signalled: list[int] = []
"""The signals `handle_sigterm`'s handler received: a library that catches the `Terminated` it
raised and raises a plain KeyboardInterrupt in its place (Ray's waits do) loses its type."""


def _terminate(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise Terminated


def handle_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in the main thread. Call it again after anything that
    installs a handler of its own: Ray's driver does (it prints a native stack dump and exits)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main`; a user-facing fault becomes one line `error: ...` on stderr and exit code 2.

    The faults: a `MarsSegError` (bad input: an archive, a config file, a model file, a flag, a
    device, an output path) and an `OSError` (a missing file, a full disk, permission denied, a
    read-only filesystem), named by what failed and the path. Anything else is a bug in the
    project and keeps its traceback.
    """
    handle_sigterm()
    _signalled.clear()
    try:
        return main(argv) or 0
    except MarsSegError as err:
        print(f"error: {err}", file=sys.stderr)
    except FileNotFoundError as err:
        print(f"error: file not found: {err.filename or err}", file=sys.stderr)
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated) or _signalled:
            print("error: terminated (SIGTERM)", file=sys.stderr)
            return TERMINATED_EXIT
        print(f"error: {str(err) or 'interrupted'}", file=sys.stderr)  # a message: what to do
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
        "--max-epochs", "--epochs", dest="max_epochs", type=COUNT, metavar="N", help=help
    )


def add_cpus_flag(parser: argparse.ArgumentParser, help: str, default: float | None = None) -> None:
    """`--cpus-per-trial N`: CPUs (torch threads) of each training run, in every entry point
    that trains; `--threads`, its old spelling in the non-Ray ones, still works."""
    parser.add_argument(
        "--cpus-per-trial",
        "--threads",
        dest="cpus_per_trial",
        type=CPUS,
        metavar="N",
        default=default,
        help=help,
    )


def torch_threads(cpus: float | None) -> int | None:
    """Torch threads for a run granted `cpus` CPUs: at least one for a fraction, torch's own
    default (None) when none was asked for."""
    return None if cpus is None else max(1, int(cpus))
