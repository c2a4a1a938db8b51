"""Lightning callbacks of ``trm`` (a top-level package so configs can say ``callbacks.RunSummary``)."""

from callbacks.run_summary import RunSummary

__all__ = ["RunSummary"]
