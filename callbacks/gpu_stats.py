"""GPUStats: training throughput and peak accelerator memory, for smoke tests and benchmarks."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from trm_lightning.checks import check_at_least


class GPUStats(Callback):
    """Logs ``gpu/steps_per_s`` (optimizer steps per second since the last log) and ``gpu/peak_memory_gib``
    (``torch.cuda.max_memory_allocated`` of rank 0) every ``every_n_steps`` steps, straight to the logger
    from rank 0. On a CPU only the throughput is logged.

    Args:
        every_n_steps: steps between two logs.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        check_at_least("GPUStats.every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._step0 = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._t0 is None:  # start the clock after the first step (compilation, allocator warm-up)
            self._t0, self._step0 = time.perf_counter(), step
            return
        if step % self.every_n_steps:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        values = {"gpu/steps_per_s": (step - self._step0) / max(now - self._t0, 1e-9)}
        if torch.cuda.is_available():
            values["gpu/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if trainer.is_global_zero and trainer.logger is not None:  # local numbers, no collective involved
            trainer.logger.log_metrics(values, step=step)
        self._t0, self._step0 = now, step
