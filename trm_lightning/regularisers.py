"""Regularisers against the memorisation shortcut of meta-learning, added to the training loss (off by default).

**Demo-subset contrastive loss** (``model.context_contrastive_weight``): each training row's valid demos are split
at random into two disjoint, non-empty subsets A and B (a row with one demo uses it in both); the conditioner
encodes the row twice, once from A and once from B, and a symmetric InfoNCE loss asks the context from A to be
nearer to the same row's context from B than to any other row's (rows of the same task are not used as
negatives). A context that identifies the rule, whichever demos show it, satisfies this; a context that encodes
which particular grids were shown (a task's identity, what a memorising decoder could key on) does not. The
contexts compared are the whole prefix the TRM reads, flattened, on the unit sphere, divided by a temperature.

Cost in training: two more passes of the set encoder per step (with gradient); the demo pairs are encoded once for
the step's context and both subsets (``EncoderTRM.act_step(..., views=contrastive_views)``). None in evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def demo_subsets(demo_mask: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two disjoint subsets of each row's valid demo slots, (B, K) bool each, both non-empty when the row has a
    demo: a random order of the valid slots, cut after a random ``k`` in ``1..n-1`` (``n`` valid slots). A row with
    one valid demo gets it in both subsets; a row with none gets two empty ones."""
    B, K = demo_mask.shape
    device = demo_mask.device
    scores = torch.rand(B, K, generator=generator, device=device).masked_fill(~demo_mask, 2.0)  # invalid slots last
    rank = scores.argsort(dim=1).argsort(dim=1)  # position of each slot in the row's random order
    n = demo_mask.sum(dim=1)
    cut = 1 + (torch.rand(B, generator=generator, device=device) * (n - 1).clamp_min(1)).long()  # 1..n-1
    first = demo_mask & (rank < cut[:, None])
    second = demo_mask & (rank >= cut[:, None])
    single = (n < 2)[:, None]
    return torch.where(single, demo_mask, first), torch.where(single, demo_mask, second)


def info_nce(a: Tensor, b: Tensor, groups: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE of row embeddings ``a`` and ``b`` (B, E): row i of ``a`` must pick row i of ``b`` (and the
    other way round) among the rows of other ``groups`` (B,); other rows of its own group are left out. Cosine
    similarities divided by ``temperature``; fp32."""
    a = F.normalize(a.float().flatten(1), dim=-1)
    b = F.normalize(b.float().flatten(1), dim=-1)
    logits = a @ b.T / temperature
    same = groups[:, None] == groups[None, :]
    eye = torch.eye(len(groups), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    targets = torch.arange(len(groups), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def contrastive_views(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The two demo subsets of the loss for ``batch``'s rows (:func:`demo_subsets` of its ``demo_mask``), as the
    ``views`` that ``EncoderTRM.act_step`` encodes beside the step's context."""
    return demo_subsets(batch["demo_mask"].bool())


def demo_subset_contrastive_loss(
    encode: nn.Module, batch: Mapping[str, Tensor], temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """The demo-subset contrastive loss of the rows of ``batch`` (module docstring); ``encode(batch) -> (B, P, D)``
    is the conditioner (or ``EncoderTRM.encode``), which encodes the batch once per subset. Rows are grouped by
    ``task_index``. Training gets the same loss from :func:`info_nce` of the contexts of :func:`contrastive_views`
    that ``act_step`` returns, with the demos encoded once."""
    first, second = demo_subsets(batch["demo_mask"].bool(), generator)
    context_a = encode({**batch, "demo_mask": first})
    context_b = encode({**batch, "demo_mask": second})
    return info_nce(context_a, context_b, batch["task_index"], temperature)
