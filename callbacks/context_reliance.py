"""ContextReliance: how much the TRM's answers depend on the demo encoder's context.

Every ``every_n_validations`` validations, each batch of the held-out view (dataloader 0, ``val``) is run
again twice through the model's rollout (``pl_module.model.rollout``) with the validation step's context
replaced:

- **shuffled**: row i gets the context of row ``perm[i]``, a fixed derangement that pairs rows of different
  tasks whenever the batch allows it (no task holds more than half the rows), see :func:`derangement`;
- **zeroed**: every context value set to 0.

Exact and cell accuracy are counted as the module counts them (rows with at least one supervised cell;
cell accuracy = the per-row fraction of supervised cells right, averaged over rows), summed on every rank
and all-reduced at the epoch end. Logged at the validation epoch end:

- ``val/exact_accuracy_shuffled_context``, ``val/accuracy_shuffled_context``;
- ``val/exact_accuracy_zero_context``, ``val/accuracy_zero_context``;
- ``val/reliance_drop_shuffled`` / ``val/reliance_drop_zero``: real minus ablated exact accuracy, and
  ``val/reliance_drop_shuffled_cell`` / ``val/reliance_drop_zero_cell``: the same for cell accuracy.

A TRM that ignores its context shows drops of exactly zero. A batch of one row cannot be shuffled: its row is
left out of the shuffled numbers (and of the real numbers they are compared with).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from trm_lightning.losses import row_accuracy
from trm_lightning.metric_names import VAL, split_metric

# positions in the per-epoch sums
ROWS, EXACT, CELL, ZERO_EXACT, ZERO_CELL, SHUF_ROWS, SHUF_REAL_EXACT, SHUF_REAL_CELL, SHUF_EXACT, SHUF_CELL = range(10)


def derangement(task_index: Tensor) -> Tensor | None:
    """A fixed permutation with no fixed point that sends each row to a row of another task when possible.

    Rows are sorted by task (stably) and shifted by the largest task count ``m`` in that order, so when
    ``2 m <= B`` no row lands in its own task's block; otherwise (or with a single task) the shift still moves
    every row. None for fewer than two rows.
    """
    n = task_index.numel()
    if n < 2:
        return None
    order = torch.argsort(task_index.cpu(), stable=True)
    largest = int(torch.unique(task_index.cpu(), return_counts=True)[1].max())
    shift = largest if largest < n else 1
    perm = torch.empty_like(order)
    perm[order] = order.roll(-shift)
    return perm.to(task_index.device)


class ContextReliance(Callback):
    """Re-runs the held-out validation batches with shuffled and zeroed contexts and logs the accuracy drop.

    Args:
        every_n_validations: run at every this-many-th validation (sanity checks do not count).
        dataloader_idx: the validation dataloader to ablate (0 = ``val``, the held-out tasks).
    """

    def __init__(self, every_n_validations: int = 1, dataloader_idx: int = 0) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        self.every_n_validations = every_n_validations
        self.dataloader_idx = dataloader_idx
        self._validations = 0
        self._sums: Tensor | None = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums = None
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._sums = torch.zeros(10, dtype=torch.float64, device=pl_module.device)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._sums is None or dataloader_idx != self.dataloader_idx:
            return
        labels = batch["labels"]
        has, exact, cell = row_accuracy(outputs["predictions"], labels)
        counted = has.double()
        model, context = pl_module.model, outputs["context"]
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            zero_logits = model.rollout(batch, context=torch.zeros_like(context)).logits
            perm = derangement(batch["task_index"])
            shuf_logits = model.rollout(batch, context=context[perm]).logits if perm is not None else None
        _, zero_exact, zero_cell = row_accuracy(zero_logits.argmax(-1), labels)
        s = self._sums
        s[ROWS] += counted.sum()
        s[EXACT] += (exact.double() * counted).sum()
        s[CELL] += (cell * counted).sum()
        s[ZERO_EXACT] += (zero_exact.double() * counted).sum()
        s[ZERO_CELL] += (zero_cell * counted).sum()
        if shuf_logits is not None:
            _, shuf_exact, shuf_cell = row_accuracy(shuf_logits.argmax(-1), labels)
            s[SHUF_ROWS] += counted.sum()
            s[SHUF_REAL_EXACT] += (exact.double() * counted).sum()
            s[SHUF_REAL_CELL] += (cell * counted).sum()
            s[SHUF_EXACT] += (shuf_exact.double() * counted).sum()
            s[SHUF_CELL] += (shuf_cell * counted).sum()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sums is None:
            return
        sums, self._sums = self._sums, None
        if trainer.world_size > 1:  # every rank reaches here with its sums
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        values: dict[str, Tensor] = {}
        rows = sums[ROWS]
        if rows > 0:
            values[split_metric(VAL, "exact_accuracy_zero_context")] = sums[ZERO_EXACT] / rows
            values[split_metric(VAL, "accuracy_zero_context")] = sums[ZERO_CELL] / rows
            values[split_metric(VAL, "reliance_drop_zero")] = (sums[EXACT] - sums[ZERO_EXACT]) / rows
            values[split_metric(VAL, "reliance_drop_zero_cell")] = (sums[CELL] - sums[ZERO_CELL]) / rows
        shuf_rows = sums[SHUF_ROWS]
        if shuf_rows > 0:
            values[split_metric(VAL, "exact_accuracy_shuffled_context")] = sums[SHUF_EXACT] / shuf_rows
            values[split_metric(VAL, "accuracy_shuffled_context")] = sums[SHUF_CELL] / shuf_rows
            values[split_metric(VAL, "reliance_drop_shuffled")] = (sums[SHUF_REAL_EXACT] - sums[SHUF_EXACT]) / shuf_rows
            values[split_metric(VAL, "reliance_drop_shuffled_cell")] = (sums[SHUF_REAL_CELL] - sums[SHUF_CELL]) / shuf_rows
        for name, value in values.items():
            pl_module.log(name, value.float(), on_step=False, on_epoch=True, batch_size=1)
