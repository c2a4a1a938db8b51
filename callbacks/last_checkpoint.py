"""LastCheckpoint: ``last.ckpt`` every N optimizer steps, at the end of training, on a crash or SIGTERM,
and never with non-finite weights.

A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps no top-k files (the best-validation one is
the CLI's ``checkpoint:`` section) and only refreshes ``<run>/checkpoints/last.ckpt``. Lightning writes it
atomically (to a temporary file, then a rename), so a kill mid-write leaves the previous one intact. What it
adds to ModelCheckpoint:

- before each save, the weights are checked: if any is NaN or infinite the save is skipped with a message,
  so ``last.ckpt`` always holds the last finite state and its step;
- on SIGTERM or the first Ctrl-C (both stop at the end of a step, on every rank) and on an exception (one
  process) it saves ``last.ckpt``; under DDP other crashes are not saved, since one rank alone cannot take part in
  the save's collectives; an immediate KeyboardInterrupt (a second Ctrl-C) saves nothing, since it lands in the
  middle of a step: the periodic ``last.ckpt`` stays the state to resume from;
- at the last step (``max_steps``, the last epoch, or a stop requested by a callback) ``last.ckpt`` is
  brought up to the final state;
- under ``fast_dev_run`` nothing is saved at all, as Lightning means it ("logging and checkpointing is
  suppressed"): such a run has no run directory, and ModelCheckpoint's own ``save_last`` at ``on_train_end``,
  which skips that check, would write ``./checkpoints/last-v<N>.ckpt`` into the current directory.

Resume with ``trm fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trm_lightning.run_files import CHECKPOINT_SUFFIX, LAST_CHECKPOINT_STEM


def weights_are_finite(module: LightningModule) -> bool:
    params = [p.detach() for p in module.parameters()]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(params)).item()) if params else True


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current: every ``every_n_train_steps`` steps, at the end, on a crash or SIGTERM.

    Args:
        every_n_train_steps: optimizer steps between two saves (0: only at the end, on a crash, on SIGTERM).
        dirpath: where ``last.ckpt`` goes; None = ``<run dir>/checkpoints`` as for ModelCheckpoint.
    """

    # the name the resume instructions give (README, `make demo`), pinned here rather than left to Lightning
    CHECKPOINT_NAME_LAST = LAST_CHECKPOINT_STEM
    FILE_EXTENSION = CHECKPOINT_SUFFIX

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=True,
        )
        self.last_finite_step: int | None = None

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if not weights_are_finite(trainer.lightning_module):
            kept = f"{self.last_model_path} keeps step {self.last_finite_step}" if self.last_model_path else (
                "no earlier checkpoint exists")
            rank_zero_warn(f"LastCheckpoint: not saving step {trainer.global_step}: the weights are not finite; {kept}, "
                           "the last finite state")
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.last_finite_step = trainer.global_step

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            return  # raised mid-step (a second Ctrl-C, or outside training): the periodic last.ckpt is consistent
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return
        if not self._should_save_on_exception(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # the final step, saved here rather than at on_train_end: by then EMAWeightAveraging has replaced the
        # live weights by the average, and a resume must continue from the live ones
        last_step = 0 < trainer.max_steps <= trainer.global_step
        if (last_step or trainer.should_stop) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if last_epoch and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:  # ModelCheckpoint.on_train_end saves last even then (its other saves check it)
            return
        super().on_train_end(trainer, pl_module)
