"""Errors the command line reports as one line (``trm: error: ...``) instead of a traceback."""


class TRMError(Exception):
    """Base class of user-facing errors: bad data, bad configuration, bad checkpoints."""


class DataError(TRMError):
    """Malformed or unusable ARC data. The message names the file, the task and the pair."""


class ConfigError(TRMError):
    """A configuration that cannot work (for example a batch that does not divide by the world size)."""
