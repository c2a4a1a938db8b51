"""``trm report``: the experiment-tracking table and plots, generated from the run directories themselves.

- :mod:`~trm_lightning.report.runs`: find run directories, read config, status, alerts, scalars, evaluations;
- :mod:`~trm_lightning.report.config_diff`: resolved configs as dotted keys, and a run's change from the baseline;
- :mod:`~trm_lightning.report.summary`: one :class:`~trm_lightning.report.summary.Row` per run;
- :mod:`~trm_lightning.report.tables`: ``report.md`` and ``report.csv``;
- :mod:`~trm_lightning.report.plots`: the PNG overlays;
- :mod:`~trm_lightning.report.command`: the command line (``trm report --help``).
"""

from __future__ import annotations


def main(argv: list[str] | None = None):
    """``trm report ...`` (``argv`` without the word ``report``); see :mod:`trm_lightning.report.command`."""
    from trm_lightning.report.command import main as run

    return run(argv)
