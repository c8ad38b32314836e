"""Shared plumbing for the `python -m ...` entry points."""

from __future__ import annotations

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
