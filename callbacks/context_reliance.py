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

With ``train_every_n_steps`` it also measures, during training and without a validation pass, the same drop on
the first ``train_rows`` rows in training (an evaluation rollout of each with its own context and with a shuffled
one), every that many optimizer steps, averaged over ranks: ``train/reliance_drop_shuffled`` and
``train/reliance_drop_shuffled_cell``. A long run sees early whether the TRM answers without reading its demos.
Both the validation and the training values are published for :class:`~callbacks.IgnoredEncoder`.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from callbacks.helpers import MetricProducer, due
from trm_lightning import metric_names as names

from trm_lightning.checks import check_at_least
from trm_lightning.losses import row_accuracy
from trm_lightning.metric_names import VAL, split_metric

ABLATIONS = ("zero", "shuffled")  # in the order they run
# per ablation, summed over the epoch's rows: rows counted, real exact and cell accuracy, ablated exact and cell
ROWS, REAL_EXACT, REAL_CELL, EXACT, CELL = range(5)


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


def ablation_metrics(sums: Tensor) -> dict[str, Tensor]:
    """The logged values from the epoch's sums (one row per ablation of :data:`ABLATIONS`): accuracies with the
    ablated context and the drops from the real one; an ablation that counted no row logs nothing."""
    values = {}
    for ablation, s in zip(ABLATIONS, sums):
        rows = s[ROWS]
        if rows > 0:
            values[f"exact_accuracy_{ablation}_context"] = s[EXACT] / rows
            values[f"accuracy_{ablation}_context"] = s[CELL] / rows
            values[f"reliance_drop_{ablation}"] = (s[REAL_EXACT] - s[EXACT]) / rows
            values[f"reliance_drop_{ablation}_cell"] = (s[REAL_CELL] - s[CELL]) / rows
    return {split_metric(VAL, k): v for k, v in values.items()}


class ContextReliance(MetricProducer):
    """Re-runs the held-out validation batches with shuffled and zeroed contexts and logs the accuracy drop.

    Args:
        every_n_validations: run at every this-many-th validation (sanity checks do not count).
        dataloader_idx: the validation dataloader to ablate (0 = ``val``, the held-out tasks).
        train_every_n_steps: every this many optimizer steps, also measure the shuffled-context drop on rows in
            training (0: off).
        train_rows: rows per rank for that measurement (the first of the ACT carry; at least 2).
    """

    publishes = names.RELIANCE_DIAGNOSTICS

    def __init__(self, every_n_validations: int = 1, dataloader_idx: int = 0, train_every_n_steps: int = 0,
                 train_rows: int = 16) -> None:
        super().__init__()
        check_at_least("ContextReliance.every_n_validations", every_n_validations, 1)
        check_at_least("ContextReliance.dataloader_idx", dataloader_idx, 0)
        check_at_least("ContextReliance.train_every_n_steps", train_every_n_steps, 0)
        check_at_least("ContextReliance.train_rows", train_rows, 2)
        self.every_n_validations = every_n_validations
        self.dataloader_idx = dataloader_idx
        self.train_every_n_steps = train_every_n_steps
        self.train_rows = train_rows
        self._validations = 0
        self._sums: Tensor | None = None

    @property
    def state_key(self) -> str:
        """Unique per configuration, so two of these callbacks in one run each keep their own checkpointed state."""
        return self._generate_state_key(every_n_validations=self.every_n_validations, dataloader_idx=self.dataloader_idx)

    def state_dict(self) -> dict:
        return {"validations": self._validations}  # a resumed run keeps the every-n-th validation rhythm

    def load_state_dict(self, state_dict: dict) -> None:
        self._validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums = None
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._sums = torch.zeros(len(ABLATIONS), 5, dtype=torch.float64, device=pl_module.device)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._sums is None or dataloader_idx != self.dataloader_idx:
            return
        labels = batch["labels"]
        has, exact, cell = row_accuracy(outputs["predictions"], labels)
        counted = has.double()
        context = outputs["context"]
        perm = derangement(batch["task_index"])
        contexts = {"zero": torch.zeros_like(context), "shuffled": context[perm] if perm is not None else None}
        for i, ablation in enumerate(ABLATIONS):
            if contexts[ablation] is None:  # one row: nothing to shuffle with
                continue
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                logits = pl_module.model.rollout(batch, context=contexts[ablation]).logits
            _, ablated_exact, ablated_cell = row_accuracy(logits.argmax(-1), labels)
            parts = (counted, exact.double() * counted, cell * counted, ablated_exact.double() * counted,
                     ablated_cell * counted)
            self._sums[i] += torch.stack([p.sum() for p in parts])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sums is None:
            return
        sums, self._sums = self._sums, None
        if trainer.world_size > 1:  # every rank reaches here with its sums
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        values = ablation_metrics(sums)
        for name, value in values.items():
            pl_module.log(name, value.float(), on_step=False, on_epoch=True, batch_size=1)
        self.remember(trainer.global_step, {k: v for k, v in values.items() if k in self.publishes})

    # ------------------------------------------------------------------------------ the training-time signal
    def _produce(self, trainer: Trainer, pl_module: LightningModule, outputs) -> bool:
        if not self.train_every_n_steps or not due(trainer, self.train_every_n_steps):
            return False
        rows = pl_module.training_rows() if hasattr(pl_module, "training_rows") else None
        if rows is None:
            return False
        batch = {k: v[: self.train_rows] for k, v in rows.items()}
        perm = derangement(batch["task_index"])
        if perm is None:
            return False
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                model = pl_module.model
                context = model.encode(batch)
                real = model.rollout(batch, context=context).logits.argmax(-1)
                shuffled = model.rollout(batch, context=context[perm]).logits.argmax(-1)
        finally:
            pl_module.train(was_training)
        has, exact, cell = row_accuracy(real, batch["labels"])
        _, shuf_exact, shuf_cell = row_accuracy(shuffled, batch["labels"])
        counted = has.double()
        drops = torch.stack([((exact.double() - shuf_exact.double()) * counted).sum(),
                             ((cell - shuf_cell) * counted).sum(), counted.sum()])
        if trainer.world_size > 1:  # every rank, at the same steps
            drops = trainer.strategy.reduce(drops, reduce_op="sum")
        n = drops[2].clamp_min(1)
        self.publish(pl_module, trainer.global_step, {names.TRAIN_RELIANCE_DROP_SHUFFLED: drops[0] / n,
                                                      names.TRAIN_RELIANCE_DROP_SHUFFLED_CELL: drops[1] / n})
        return True
