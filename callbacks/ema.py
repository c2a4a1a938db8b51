"""EMA: TRM's exponential moving average of the weights (``ema: True``, rate 0.999) as a Lightning callback.

Lightning's ``EMAWeightAveraging`` with two changes, both to average what TRM averages and nothing else:

- only the trainable parameters are averaged (``use_buffers=False``). With buffers averaged, the fixed RoPE tables
  and initial states drift by rounding (``d x + (1 - d) x != x`` in floating point), so an averaged model's
  evaluation depends on how many updates its buffers went through, and a resumed run (whose averaged copy restarts
  from the exact constants) evaluates differently from an uninterrupted one; and the puzzle-id table, which TRM
  keeps out of its EMA, lags behind;
- the averaged copy shares the live buffers instead of holding its own stale ones (Lightning swaps buffers in for
  validation and saves them as the averaged ``state_dict`` even when it does not average them): the puzzle table
  and every constant are the live ones wherever the averaged weights are used, in validation, test and checkpoints.

Validation, test and checkpoints use the averaged weights; checkpoints keep the live ones beside them (as
Lightning's callback does), so a resume continues from the live weights.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging

from trm_lightning.checks import check_at_least, check_range


class EMA(EMAWeightAveraging):
    """Exponential moving average of the trainable parameters (TRM's EMA); buffers stay the live ones.

    Args:
        decay: the average's decay per update (TRM: 0.999).
        update_every_n_steps: optimizer steps between two updates of the average.
        update_starting_at_step: the first optimizer step (0-based) that updates the average; None: from the start.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None) -> None:
        check_range("EMA.decay", decay, 0.0, 1.0)
        check_at_least("EMA.update_every_n_steps", update_every_n_steps, 1)
        check_at_least("EMA.update_starting_at_step", update_starting_at_step, 0, allow_none=True)
        super().__init__(use_buffers=False, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        average = self._average_model  # the parent's AveragedModel (protected: no accessor; set in setup above)
        if average is None:
            return
        for name, live in pl_module.named_buffers():  # same tensors: nothing to swap, nothing stale to save
            owner, _, leaf = name.rpartition(".")
            module = average.module.get_submodule(owner) if owner else average.module
            if getattr(module, leaf).device == live.device:
                setattr(module, leaf, live)  # nn.Module keeps it a buffer (and its persistence)
