"""Puzzle-id conditioning: the original TRM's per-puzzle embedding (``reference/trm.md`` §1.2, §3).

Every augmented puzzle version has an id; the table holds one vector per id, **zero-initialised**. The
prefix is that vector (times sqrt(D), TRM's embedding scale) in slot 0 and zeros in the other slots.
Id 0 is the blank id: never trained, so a puzzle the table has never seen gets an all-zero prefix.

The table is a buffer, not a parameter: AdamW never sees it. Each training forward copies the rows it
needs into a small leaf tensor that receives the gradient; :meth:`PuzzleEmbedding.sign_update` then
applies TRM's sparse SignSGD with decoupled weight decay to the touched rows only,
``w <- w * (1 - lr * wd) - lr * sign(sum of the row's gradients)``. The memory an update needs is
proportional to the rows touched per step, never to the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


class PuzzleEmbedding(nn.Module):
    """Zero-initialised per-puzzle vectors as the TRM prefix, trained by sparse SignSGD.

    Args:
        num_ids: rows of the table (id 0 is the blank id).
        hidden_size: width D.
        prefix_len: prefix slots; slot 0 carries the puzzle vector, the others are zeros.
    """

    def __init__(self, num_ids: int, hidden_size: int, prefix_len: int) -> None:
        super().__init__()
        if num_ids < 1 or prefix_len < 1:
            raise ValueError(f"PuzzleEmbedding needs num_ids >= 1 and prefix_len >= 1, got {num_ids}, {prefix_len}")
        self.prefix_len = prefix_len
        self.scale = math.sqrt(hidden_size)
        self.register_buffer("weights", torch.zeros(num_ids, hidden_size))
        self._pending: list[tuple[Tensor, Tensor]] = []  # (ids, local rows) of forwards since the last update

    @property
    def num_ids(self) -> int:
        return self.weights.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        """(B,) ids -> prefix (B, prefix_len, D). Out-of-range ids are an error, not a silent wrap."""
        ids = ids.long()
        # checked on CPU only: on a GPU the check would cost a host sync every step (CUDA asserts anyway)
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_ids):
            raise IndexError(f"puzzle ids must be in [0, {self.num_ids}), got [{int(ids.min())}, {int(ids.max())}]")
        rows = self.weights[ids]
        if self.training and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)  # the gradient lands here, not on the table
            self._pending.append((ids, rows))
        prefix = rows.new_zeros(ids.shape[0], self.prefix_len, rows.shape[-1])
        return torch.cat([rows.unsqueeze(1) * self.scale, prefix[:, 1:]], dim=1)

    def clear(self) -> None:
        """Forget the pending local rows (e.g. after a forward that was not back-propagated)."""
        self._pending.clear()

    @torch.no_grad()
    def sign_update(
        self, lr: float, weight_decay: float, gather: Callable[[Tensor], Tensor] | None = None
    ) -> int:
        """Apply SignSGD to the rows touched since the last update; returns the bytes the update held.

        ``gather`` concatenates a tensor over ranks (identity on one process): every rank then applies
        the same update, so the tables stay equal without a broadcast. Gradients of one id from several
        rows, ranks or accumulated micro-batches are summed before the sign.
        """
        pending = [(ids, rows.grad) for ids, rows in self._pending if rows.grad is not None]
        self._pending.clear()
        if not pending:
            return 0
        ids = torch.cat([i for i, _ in pending])
        grads = torch.cat([g for _, g in pending]).float()
        if gather is not None:
            ids, grads = gather(ids), gather(grads)
        unique, inverse = torch.unique(ids, return_inverse=True)
        summed = grads.new_zeros(unique.shape[0], grads.shape[-1]).index_add_(0, inverse, grads)
        keep = unique != 0  # the blank id stays zero
        unique, summed = unique[keep], summed[keep]
        rows = self.weights[unique]
        self.weights[unique] = rows * (1.0 - lr * weight_decay) - lr * torch.sign(summed)
        touched = ids.numel() * ids.element_size() + grads.numel() * grads.element_size()
        return touched + summed.numel() * summed.element_size() + rows.numel() * rows.element_size()
