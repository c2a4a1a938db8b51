"""The names of the files a run directory holds, each written once: the writers and ``trm report`` import them.

A run directory is what ``TensorBoardLogger`` makes, ``<runs>/<name>/version_<n>/`` (``trainer.log_dir``):

- ``config.yaml``: the resolved config (LightningCLI's ``SaveConfigCallback``);
- ``experiment.json``: the ``--config`` files and the hypothesis line (``trm_lightning.cli.RecordingSaveConfig``);
- ``status.json``: running / finished / crashed, per stage (:class:`callbacks.RunStatus`);
- ``alerts.jsonl``: one record per alert that fired (:class:`callbacks.CollapseAlert`);
- ``submission.json``, ``eval_details.json``: the ARC evaluation of ``trm test`` (:mod:`trm_lightning.evaluation`);
- ``fewshot_eval.json``: the held-out-rule benchmark's counts (``benchmarks/bench_fewshot.py``, ``sweep_fewshot.py``);
- ``events.out.tfevents.*``: TensorBoard's event files;
- ``checkpoints/``: ``last.ckpt`` (:class:`callbacks.LastCheckpoint`, for resuming), the best-validation checkpoint
  (the CLI's ``checkpoint:`` section) and ``alert-step<N>.ckpt`` (a ``stop`` or ``raise`` alert at step N).

Beside the runs, ``trm report`` writes ``report/report.md`` and ``report/report.csv``.

``checkpoints`` and ``last.ckpt`` are also Lightning's own defaults for ``ModelCheckpoint`` (its run-directory
resolution and ``CHECKPOINT_NAME_LAST``); :class:`callbacks.LastCheckpoint` pins its file name to the one here.
"""

from __future__ import annotations

import os

CONFIG_FILE = "config.yaml"
EXPERIMENT_FILE = "experiment.json"
STATUS_FILE = "status.json"
ALERTS_FILE = "alerts.jsonl"
SUBMISSION_FILE = "submission.json"
EVAL_DETAILS_FILE = "eval_details.json"
FEWSHOT_EVAL_FILE = "fewshot_eval.json"
EVENTS_PREFIX = "events.out.tfevents."

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".ckpt"
LAST_CHECKPOINT_STEM = "last"
LAST_CHECKPOINT = LAST_CHECKPOINT_STEM + CHECKPOINT_SUFFIX

#: the files whose presence marks a folder as a run directory (besides its ``version_<n>`` name or an event file)
RUN_FILES = (CONFIG_FILE, EXPERIMENT_FILE, STATUS_FILE, ALERTS_FILE, EVAL_DETAILS_FILE, FEWSHOT_EVAL_FILE)

# ``trm report``'s output beside the runs (``<runs>/report/`` by default); a folder holding both is never scanned
REPORT_DIR = "report"
REPORT_MARKDOWN = "report.md"
REPORT_CSV = "report.csv"


def alert_checkpoint_name(step: int) -> str:
    """``alert-step<N>.ckpt``: the checkpoint a ``stop`` or ``raise`` alert saves at optimizer step N."""
    return f"alert-step{step}{CHECKPOINT_SUFFIX}"


def checkpoint_dir(run_dir: str | os.PathLike) -> str:
    """``<run_dir>/checkpoints``."""
    return os.path.join(run_dir, CHECKPOINT_DIR)
