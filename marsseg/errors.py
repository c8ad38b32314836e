"""Errors that carry a one-line, user-facing message.

Entry points catch `MarsSegError` and print its message alone (see `marsseg.cli`), so a bad
archive or config reads as one clear line instead of a traceback from deep inside a library.
"""


class MarsSegError(ValueError):
    """Base class: its message must name the offending key, field, shape or value."""


class DataError(MarsSegError):
    """An archive, array or prediction that does not match the challenge's format."""


class CheckpointError(DataError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a checkpoint at all.

    Resuming code catches it and falls back to an older checkpoint or a fresh start."""


class ConfigError(MarsSegError):
    """A configuration field with an unknown name or an invalid value."""


class SearchError(MarsSegError):
    """A search stage that cannot start or go on: an unreachable cluster, unservable resources,
    unwritable storage, a missing experiment, data that differs from the experiment's."""


class OutputError(MarsSegError):
    """An output path that cannot be written: not a folder, not writable, or on a disk with too
    little free space. Raised before the work whose result would be lost."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its type's name when it has none): what a
    one-line message quotes of an error whose full text may run to a page."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def kind_and_first_line(err: BaseException) -> str:
    """`ValueError: first line`: the kind and `first_line` of the exception `err` carries as its
    `cause` (Ray's task and trial errors wrap the one raised in the worker that way), or of `err`
    itself: what a one-line message names a failed run by."""
    cause = getattr(err, "cause", None)
    shown = cause if isinstance(cause, BaseException) else err
    kind = type(shown).__name__
    return f"{kind}: {first_line(shown)}" if str(shown).strip() else kind


class TrainingError(MarsSegError):
    """A run that cannot go on: its loss or gradients became NaN or infinite. Raised at the step
    it happened, before the optimiser applies it, so no model of non-finite weights is kept."""
