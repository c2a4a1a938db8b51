"""Errors the command line reports as one line (``trm: error: ...``) instead of a traceback."""

from __future__ import annotations

_latest: TRMError | None = None  # the latest one created (see :func:`buried_in`)


class TRMError(Exception):
    """Base class of user-facing errors: bad data, bad configuration, bad checkpoints.

    The CLI prints ``prefix + message`` on stderr and exits with ``exit_code``.
    """

    exit_code = 2
    prefix = "trm: error: "

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        global _latest
        _latest = self


def buried_in(err: BaseException) -> TRMError | None:
    """The TRMError whose message another exception carries as text: jsonargparse instantiates a config's callbacks
    while it tries the types of a union, and reports an argument check that failed there (a ``ConfigError``) only
    inside its own message, so the command line recovers the one line it meant."""
    if _latest is not None and str(_latest) and str(_latest) in str(err):
        return _latest
    return None


class DataError(TRMError):
    """Malformed or unusable ARC data. The message names the file, the task and the pair."""


class ConfigError(TRMError, ValueError):
    """A configuration that cannot work: a value out of its range, a batch that does not divide by the world size.
    Also a ``ValueError``, which is what it is to code that calls a class with a bad argument."""


class GateFailure(TRMError):
    """A pass/fail check (the E1 overfit gate) failed; the message is the verdict line, printed as is."""

    exit_code = 1
    prefix = ""
