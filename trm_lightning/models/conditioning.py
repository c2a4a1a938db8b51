"""Conditioners: what fills the TRM's prefix, and the original TRM's per-puzzle embedding.

A conditioner is an ``nn.Module`` whose ``forward(batch)`` returns the context ``(B, prefix_len, D)`` for the
rows of a batch dict, reading what it needs from it (the demo encoder: ``demo_inputs``, ``demo_outputs``,
``demo_mask``; the puzzle table: ``puzzle_id``). Its first constructor argument is a :class:`ConditionerShape`
(the sizes decided by the TRM and the data); every other argument is a knob of that conditioner. That makes a
conditioner class injectable by name from a config (``model.conditioner: {class_path: ..., init_args: ...}``,
:data:`ConditionerFactory`) without any change to the LightningModule.

Puzzle-id conditioning (``reference/trm.md`` §1.2, §3): every augmented puzzle version has an id; the table holds
one vector per id, **zero-initialised**. The prefix is that vector (times sqrt(D), TRM's embedding scale) in slot
0 and zeros in the other slots. Id 0 is the blank id: never trained, so a puzzle the table has never seen gets an
all-zero prefix. The table is a buffer, not a parameter: AdamW never sees it. Each training forward copies the
rows it needs into a small leaf tensor that receives the gradient; :meth:`PuzzleEmbedding.sign_update` then
applies TRM's sparse SignSGD with decoupled weight decay to the touched rows only,
``w <- w * (1 - lr * wd) - lr * sign(sum of the row's gradients)``. The memory an update needs is
proportional to the rows touched per step, never to the table.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from trm_lightning.vocab import VOCAB_SIZE


@dataclass(frozen=True)
class ConditionerShape:
    """The sizes a conditioner builds to, all decided elsewhere (the TRM's config and the data).

    Attributes:
        hidden_size: width D of the context tokens (the TRM's width).
        num_heads: attention heads (for conditioners with attention).
        expansion: SwiGLU expansion factor (for conditioners with MLPs).
        prefix_len: context tokens to emit (``model.puzzle_emb_len``).
        canvas_size: side S of the token canvas the demos are written on.
        vocab_size: token vocabulary of the canvas.
        num_puzzle_ids: rows of a puzzle-id table (linked from the data).
        compile: the conditioner may ``torch.compile`` its heavy part (``model.compile``).
    """

    hidden_size: int
    prefix_len: int
    num_heads: int = 8
    expansion: float = 4.0
    canvas_size: int = 30
    vocab_size: int = VOCAB_SIZE
    num_puzzle_ids: int = 1
    compile: bool = False


class Conditioner(nn.Module, ABC):
    """Base of everything that fills the TRM prefix: ``forward(batch) -> (B, prefix_len, D)``.

    Class attributes a subclass may set:

    - ``reads_demos``: True when the context is computed from the batch's demo pairs (the TRM then needs them);
    - ``runtime_options``: constructor arguments that change only how the context is computed, never its value
      (a checkpoint may be resumed with other values of these).
    """

    reads_demos: ClassVar[bool] = True
    runtime_options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The (B, P, D) context of the batch's rows."""

    def encode_views(self, batch: Mapping[str, Tensor], view_masks: Sequence[Tensor]) -> list[Tensor]:
        """The batch's context, then one context per mask of ``view_masks`` ((B, K) bool, each within the batch's
        ``demo_mask``): the rows read with only those demos. Equal to ``[self(batch)]`` followed by
        ``self({**batch, "demo_mask": m})`` for each mask, which is what this default computes; a conditioner that
        encodes each demo on its own overrides it to encode every demo once for all the views."""
        return [self(batch)] + [self({**batch, "demo_mask": m}) for m in view_masks]


# What ``model.conditioner`` holds: a conditioner class (or a class with some of its knobs bound) that the
# LightningModule calls with the shape. LightningCLI parses it from ``class_path`` + ``init_args``.
ConditionerFactory = Callable[[ConditionerShape], Conditioner]


class PuzzleEmbedding(Conditioner):
    """The original TRM's conditioning: a zero-initialised vector per puzzle id, trained by sparse SignSGD
    (its learning rate and decay are ``model.puzzle_emb_lr`` / ``model.puzzle_emb_weight_decay``). No demo is read.

    Args:
        shape: the sizes (``num_puzzle_ids`` rows, ``hidden_size`` wide; slot 0 of ``prefix_len`` carries the vector).
    """

    reads_demos = False

    def __init__(self, shape: ConditionerShape) -> None:
        super().__init__()
        if shape.num_puzzle_ids < 1 or shape.prefix_len < 1:
            raise ValueError(
                f"PuzzleEmbedding needs num_puzzle_ids >= 1 and prefix_len >= 1, got {shape.num_puzzle_ids}, "
                f"{shape.prefix_len}"
            )
        self.prefix_len = shape.prefix_len
        self.scale = math.sqrt(shape.hidden_size)
        self.register_buffer("weights", torch.zeros(shape.num_puzzle_ids, shape.hidden_size))
        self._pending: list[tuple[Tensor, Tensor]] = []  # (ids, local rows) of forwards since the last update

    @property
    def num_ids(self) -> int:
        return self.weights.shape[0]

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The rows' ``puzzle_id`` (B,) -> prefix (B, prefix_len, D). Out-of-range ids are an error, not a wrap."""
        ids = batch["puzzle_id"].long()
        # checked on CPU only: on a GPU the check would cost a host sync every step (CUDA asserts anyway)
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_ids):
            raise IndexError(f"puzzle ids must be in [0, {self.num_ids}), got [{int(ids.min())}, {int(ids.max())}]")
        rows = self.weights[ids]
        if self.training and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)  # the gradient lands here, not on the table
            self._pending.append((ids, rows))
        prefix = rows.new_zeros(ids.shape[0], self.prefix_len, rows.shape[-1])
        return torch.cat([rows.unsqueeze(1) * self.scale, prefix[:, 1:]], dim=1)

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
