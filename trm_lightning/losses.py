"""TRM's loss (``reference/trm.md`` §2): token cross-entropy (stablemax in fp64, or softmax) averaged over
each row's supervised cells, plus ``q_halt_loss_weight`` x BCE(q_halt, "the whole grid is right now").

Per row: ``lm = sum(CE over labels != -100) / max(1, n_labels)``; ``q = BCE(q_halt_logit, exact)``.
The batch loss is the mean over rows of ``lm + w * q``: TRM sums rows and divides by the global batch,
which is the same number once DDP averages gradients across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trm_lightning.vocab import IGNORE_LABEL

LOSS_TYPES = ("stablemax", "softmax")


def stablemax_log_probs(logits: Tensor) -> Tensor:
    """log of s(x_i) / sum_j s(x_j), with s(x) = x + 1 for x >= 0 and 1 / (1 - x) below; in float64."""
    x = logits.double()
    # each branch only ever sees inputs where it is finite: torch.where back-propagates 0 * d(branch), and a
    # plain 1 / (1 - x) is infinite at x = 1, which turns that 0 into NaN and poisons every weight
    s = torch.where(x >= 0, x.clamp_min(0) + 1, 1 / (1 - x.clamp_max(0)))
    return torch.log(s / s.sum(dim=-1, keepdim=True))


def token_cross_entropy(logits: Tensor, labels: Tensor, loss_type: str = "stablemax") -> Tensor:
    """Per-token loss (B, T), zero where the label is ignored."""
    mask = labels != IGNORE_LABEL
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    if loss_type == "stablemax":
        logp = stablemax_log_probs(logits)
    elif loss_type == "softmax":
        logp = torch.log_softmax(logits.float(), dim=-1)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, nll, torch.zeros_like(nll))


class RowAccuracy(NamedTuple):
    """Per row (B,): ``has_labels`` (at least one supervised cell), ``exact`` (every supervised cell right) and
    ``cell`` (float64: the fraction of supervised cells right; 0 for a row without any)."""

    has_labels: Tensor
    exact: Tensor
    cell: Tensor


def row_accuracy(predictions: Tensor, labels: Tensor) -> RowAccuracy:
    """How right each row of ``predictions`` (B, T) is against ``labels`` (B, T), counting supervised cells only
    (``labels != IGNORE_LABEL``: the grid and its EOS border)."""
    mask = labels != IGNORE_LABEL
    n = mask.sum(-1)
    correct = ((predictions == labels) & mask).sum(-1)
    return RowAccuracy(n > 0, correct == n, correct.double() / n.clamp_min(1))


@dataclass
class ACTLossOutput:
    loss: Tensor  # scalar: mean over rows of lm + w * q_halt
    lm_loss: Tensor  # (B,) per-row token-mean CE
    q_halt_loss: Tensor  # (B,) per-row BCE
    token_accuracy: Tensor  # (B,) fraction of supervised cells right
    exact: Tensor  # (B,) bool, every supervised cell right
    has_labels: Tensor  # (B,) bool, the row has at least one supervised cell
    predictions: Tensor  # (B, T) argmax tokens


def act_loss(
    logits: Tensor, labels: Tensor, q_halt_logits: Tensor, q_halt_loss_weight: float = 0.5, loss_type: str = "stablemax",
    row_weight: Tensor | None = None, cell_weight: Tensor | None = None,
) -> ACTLossOutput:
    """The loss of one ACT step and the per-row quantities the metrics need. The loss is the mean over rows, or with
    ``row_weight`` (rows,) the weighted sum (test-time adaptation of several tasks in one batch: 1/rows of the task).
    ``cell_weight`` (B, T), when given, makes each row's cross-entropy the weighted mean over its supervised cells."""
    mask = labels != IGNORE_LABEL
    if cell_weight is None:
        denom = mask.sum(-1).clamp_min(1)
        lm = token_cross_entropy(logits, labels, loss_type).sum(-1) / denom
    else:
        weight = torch.where(mask, cell_weight, torch.zeros_like(cell_weight))
        lm = (token_cross_entropy(logits, labels, loss_type) * weight).sum(-1) / weight.sum(-1).clamp_min(1e-12)
    with torch.no_grad():
        preds = logits.argmax(-1)
        accuracy = row_accuracy(preds, labels)
    exact = accuracy.exact
    q_loss = F.binary_cross_entropy_with_logits(q_halt_logits.float(), exact.float(), reduction="none")
    per_row = lm + q_halt_loss_weight * q_loss.double()
    loss = per_row.mean() if row_weight is None else (per_row * row_weight.to(per_row.dtype)).sum()
    return ACTLossOutput(
        loss=loss.float(),
        lm_loss=lm.detach().float(),
        q_halt_loss=q_loss.detach(),
        token_accuracy=accuracy.cell.float(),  # as float32 division would give (double rounding is exact here)
        exact=exact,
        has_labels=accuracy.has_labels,
        predictions=preds,
    )
