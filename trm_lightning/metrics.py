"""torchmetrics for TRM's ACT semantics, synchronised across ranks by their ``dist_reduce_fx="sum"`` states.

``ACTMetrics`` counts only the rows it is told to (training: rows that halted at this step, as TRM does;
evaluation: every labelled row after the full rollout) and reports means over them:

- ``accuracy``: mean per-row fraction of supervised cells right (cells incl. the EOS border);
- ``exact_accuracy``: fraction of rows whose whole grid is right;
- ``q_halt_accuracy``: fraction of rows where (q_halt >= 0) == exact;
- ``steps``: mean ACT steps the counted rows took;
- ``count``: rows counted (summed over ranks).

``lm_loss`` and ``q_halt_loss`` are means over every row of every step (each row is supervised at every
step: deep supervision).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ACTMetrics(Metric):
    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "rows", "lm_loss", "q_halt_loss"):
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
        out = {k: (getattr(self, k) / n).float() for k in ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps")}
        out["lm_loss"] = (self.lm_loss / rows).float()
        out["q_halt_loss"] = (self.q_halt_loss / rows).float()
        out["count"] = self.count.float()
        return out
