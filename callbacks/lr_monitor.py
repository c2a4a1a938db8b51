"""LearningRates: Lightning's LearningRateMonitor (``lr/encoder``, ``lr/trm``), except that a run without a logger
(``--trainer.logger false``) simply has no learning-rate curves instead of failing at its first step."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor


class LearningRates(LearningRateMonitor):
    """Logs the learning rate of each named parameter group; does nothing when the Trainer has no logger."""

    def on_train_start(self, trainer: Trainer, *args, **kwargs) -> None:
        self._off = not trainer.loggers
        if not self._off:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if not getattr(self, "_off", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if not getattr(self, "_off", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)
