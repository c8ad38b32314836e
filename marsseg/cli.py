"""Shared plumbing for the `python -m ...` entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from marsseg.errors import MarsSegError


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main`; a `MarsSegError` or a missing file becomes one line on stderr and exit code 2.

    Anything else is a bug in the project and keeps its traceback.
    """
    try:
        return main(argv) or 0
    except MarsSegError as err:
        print(f"error: {err}", file=sys.stderr)
    except FileNotFoundError as err:
        print(f"error: file not found: {err.filename or err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 2


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """`--no-tta`, `--no-metric-aware`, `--force` and `--device`, as every predicting entry point
    spells them."""
    parser.add_argument("--no-tta", action="store_true", help="no horizontal-flip TTA")
    parser.add_argument(
        "--no-metric-aware", action="store_true", help="let the argmax pick class 0 too"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing submission")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
