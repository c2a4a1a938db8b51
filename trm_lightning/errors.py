"""Errors the command line reports as one line (``trm: error: ...``) instead of a traceback."""


class TRMError(Exception):
    """Base class of user-facing errors: bad data, bad configuration, bad checkpoints.

    The CLI prints ``prefix + message`` on stderr and exits with ``exit_code``.
    """

    exit_code = 2
    prefix = "trm: error: "


class DataError(TRMError):
    """Malformed or unusable ARC data. The message names the file, the task and the pair."""


class ConfigError(TRMError):
    """A configuration that cannot work (for example a batch that does not divide by the world size)."""


class GateFailure(TRMError):
    """A pass/fail check (the E1 overfit gate) failed; the message is the verdict line, printed as is."""

    exit_code = 1
    prefix = ""
