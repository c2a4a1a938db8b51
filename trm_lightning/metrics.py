"""torchmetrics for TRM's ACT semantics, synchronised across ranks by their ``dist_reduce_fx="sum"`` states.

``ACTMetrics`` counts only the rows it is told to (training: rows that halted at this step, as TRM does;
evaluation: every labelled row after the full rollout) and reports means over them:

- ``accuracy``: mean per-row fraction of supervised cells right (cells incl. the EOS border);
- ``exact_accuracy``: fraction of rows whose whole grid is right;
- ``q_halt_accuracy``: fraction of rows where (q_halt >= 0) == exact;
- ``steps``: mean ACT steps the counted rows took;
- ``count``: rows counted (summed over ranks).

The keys are :data:`trm_lightning.metric_names.ACT_METRIC_KEYS`; the module logs them as ``<split>/<key>``.

``lm_loss`` and ``q_halt_loss`` are means over every row of every step (each row is supervised at every
step: deep supervision).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from trm_lightning.metric_names import ACCURACY, COUNT, EXACT_ACCURACY, LM_LOSS, Q_HALT_ACCURACY, Q_HALT_LOSS, STEPS

ROWS = "rows"  # every row of every step (the losses' denominator); a state, not reported
ROW_MEANS = (ACCURACY, EXACT_ACCURACY, Q_HALT_ACCURACY, STEPS)  # means over the counted rows


class ACTMetrics(Metric):
    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in (COUNT, *ROW_MEANS, ROWS, LM_LOSS, Q_HALT_LOSS):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        counted: Tensor,
        token_accuracy: Tensor,
        exact: Tensor,
        q_halt_logits: Tensor,
        steps: Tensor,
        lm_loss: Tensor,
        q_halt_loss: Tensor,
    ) -> None:
        """All (B,) tensors. ``counted`` selects the rows for the accuracy means; losses use every row."""
        c = counted.double()
        self.count += c.sum()
        self.accuracy += (token_accuracy.double() * c).sum()
        self.exact_accuracy += (exact.double() * c).sum()
        self.q_halt_accuracy += (((q_halt_logits >= 0) == exact).double() * c).sum()
        self.steps += (steps.double() * c).sum()
        self.rows += lm_loss.numel()
        self.lm_loss += lm_loss.double().sum()
        self.q_halt_loss += q_halt_loss.double().sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        rows = self.rows.clamp_min(1)
        out = {k: (getattr(self, k) / n).float() for k in ROW_MEANS}
        out[LM_LOSS] = (self.lm_loss / rows).float()
        out[Q_HALT_LOSS] = (self.q_halt_loss / rows).float()
        out[COUNT] = self.count.float()
        return out
