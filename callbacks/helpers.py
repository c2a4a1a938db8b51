"""What more than one callback needs: when a per-step check is due, the TensorBoard writers, and
:class:`MetricProducer`, the contract by which one callback's values reach another in the same step whatever
their order in ``trainer.callbacks``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from trm_lightning.trainer_state import is_accumulating


def due(trainer: Trainer, every_n_steps: int) -> bool:
    """True in ``on_train_batch_end`` after optimizer step k when k is a multiple of ``every_n_steps``.

    k is ``trainer.global_step`` (already incremented there); with gradient accumulation only the
    micro-batch that steps counts. With ``every_n_steps`` a multiple of ``trainer.log_every_n_steps``
    every check lands on a step the logger writes.
    """
    if every_n_steps <= 0 or is_accumulating(trainer):
        return False
    return trainer.global_step > 0 and trainer.global_step % every_n_steps == 0


def tensorboard_writers(trainer: Trainer) -> list:
    """The SummaryWriters of the trainer's TensorBoard loggers (call on rank 0 only)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class MetricProducer(Callback, ABC):
    """A callback that computes metrics in ``on_train_batch_end`` and publishes each with the step it belongs to.

    A consumer (:class:`callbacks.CollapseAlert`) that needs this step's values calls :meth:`produce` itself
    before reading :attr:`published`: the first of the two calls at a step computes and logs, the second
    does nothing, so the values and the logs are the same whichever callback comes first in
    ``trainer.callbacks``. Every rank makes the same calls at the same steps (the computation may hold
    collectives).

    Subclasses list the names they may publish in :attr:`publishes` and implement :meth:`_produce`, which calls
    :meth:`publish` and returns whether anything was due at this step.
    """

    #: every metric name this callback may publish (consumers check what they read against it)
    publishes: tuple[str, ...] = ()

    def __init__(self) -> None:
        #: name -> (optimizer step, 0-d tensor): the latest value of each name published
        self.published: dict[str, tuple[int, Tensor]] = {}
        self._produced_step = -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.published = {}
        self._produced_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.produce(trainer, pl_module, outputs)

    def produce(self, trainer: Trainer, pl_module: LightningModule, outputs) -> None:
        """Compute and publish what is due at this optimizer step, once per step (idempotent)."""
        step = trainer.global_step
        if step == self._produced_step:
            return
        if self._produce(trainer, pl_module, outputs):
            self._produced_step = step

    @abstractmethod
    def _produce(self, trainer: Trainer, pl_module: LightningModule, outputs) -> bool:
        """Compute and publish this step's values; True once they are published."""

    def publish(self, pl_module: LightningModule, step: int, values: Mapping[str, Tensor]) -> None:
        """Log ``values`` (step-level scalars) and remember them as this step's."""
        for name, value in values.items():
            pl_module.log(name, value.float(), on_step=True, on_epoch=False, batch_size=1)
        self.remember(step, values)

    def remember(self, step: int, values: Mapping[str, Tensor]) -> None:
        """Remember ``values`` as step ``step``'s without logging them (values the producer logs itself, e.g. at a
        validation's end)."""
        for name, value in values.items():
            self.published[name] = (step, value.float())
