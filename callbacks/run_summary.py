"""RunSummary: one closing line a person (or a script) can read at the end of ``trm fit``."""

from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer

from trm_lightning.metric_names import TRAIN_EXACT_ACCURACY, VAL_EXACT_ACCURACY


class RunSummary(Callback):
    """Prints ``<label>: <steps> steps in <seconds> s, train exact <x>, val exact <y>, logs in <run dir>``.

    Args:
        label: the word the line starts with (``demo`` for ``make demo``).
    """

    def __init__(self, label: str = "fit") -> None:
        self.label = label
        self._start: float | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    @staticmethod
    def _metric(trainer: Trainer, key: str) -> str:
        value = trainer.callback_metrics.get(key)
        return "n/a" if value is None else f"{float(value):.4f}"

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank reads it, rank 0 prints
        if trainer.is_global_zero:
            self._print(trainer, seconds, log_dir)

    def _print(self, trainer: Trainer, seconds: float, log_dir: str | None) -> None:
        print(
            f"{self.label}: {trainer.global_step} steps in {seconds:.1f} s, "
            f"train exact {self._metric(trainer, TRAIN_EXACT_ACCURACY)}, "
            f"val exact {self._metric(trainer, VAL_EXACT_ACCURACY)}, logs in {log_dir}",
            flush=True,
        )
