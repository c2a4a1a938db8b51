"""Helpers to drive the real CLI from tests."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback

from trm_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "conf" / "tiny.yaml")


def tiny_args(train_dir, eval_dir, out_dir, *extra: str) -> list[str]:
    """Arguments (without the subcommand) for the tiny config on synthetic task directories."""
    return [
        "--config", TINY,
        f"--data.train_source={train_dir}",
        f"--data.eval_source={eval_dir}",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        *extra,
    ]


def run_tiny(subcommand: str, train_dir, eval_dir, out_dir, *extra: str):
    """Run ``trm <subcommand>`` on the tiny config; returns the CLI object (model, trainer, datamodule)."""
    return build_cli([subcommand, *tiny_args(train_dir, eval_dir, out_dir, *extra)])


def build_tiny(train_dir, eval_dir, out_dir, *extra: str):
    """Instantiate model, datamodule and trainer without running anything."""
    return build_cli(tiny_args(train_dir, eval_dir, out_dir, *extra), run=False)


class LossRecorder(Callback):
    """Appends ``{"step", "loss", "rand"}`` per optimizer step to a JSON-lines file, ``rand`` being a draw from
    torch's generator after the step (so a comparison also checks the random state)
    (``--trainer.callbacks+=tests.integration.helpers.LossRecorder --trainer.callbacks.path=...``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            record = {"step": trainer.global_step, "loss": float(outputs["loss"]), "rand": float(torch.rand(()))}
            f.write(json.dumps(record) + "\n")


class KillAtStep(Callback):
    """SIGKILLs its own process just before optimizer step ``step + 1`` starts (after step ``step``'s
    checkpoints were written): a crash that runs no handler at all."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(Callback):
    """Sends ``signal_name`` to its own process group just before optimizer step ``step + 1`` starts, as a terminal's
    Ctrl-C (SIGINT) or a scheduler (SIGTERM, SIGKILL) reaches the training process and its data workers. The run
    must have been started in a session of its own (``start_new_session=True``)."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step = step
        self.signum = signal.Signals[signal_name]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.step = -1  # once
            os.killpg(os.getpgid(0), self.signum)


class MetricRecorder(Callback):
    """Appends one JSON line per optimizer step with the loss, a draw from torch's generator after the step and every
    step-level metric logged (train/, diagnostics/, grad/, update_ratio/), and one per validation (val/): what a
    resumed run must repeat exactly. Put it last in ``trainer.callbacks`` so the other callbacks logged first."""

    PREFIXES = ("train/", "diagnostics/", "grad/", "update_ratio/")

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.PREFIXES)}
        self._write({"step": trainer.global_step, "loss": float(outputs["loss"]), "rand": float(torch.rand(())),
                     "metrics": metrics})

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        self._write({"validation_at": trainer.global_step, "metrics": metrics})
