"""The puzzle-id baseline's table: TRM's prefix layout and its sparse SignSGD."""

from __future__ import annotations

import math

import pytest
import torch

from trm_lightning.models.conditioning import ConditionerShape, PuzzleEmbedding


def _table(num_ids: int, hidden_size: int, prefix_len: int) -> PuzzleEmbedding:
    return PuzzleEmbedding(ConditionerShape(hidden_size=hidden_size, prefix_len=prefix_len, num_puzzle_ids=num_ids))


def test_prefix_is_zero_init_vector_in_slot_zero():
    emb = _table(10, 8, 4)
    emb.weights[3] = torch.arange(8.0)
    out = emb.eval()({"puzzle_id": torch.tensor([3, 0])})
    assert out.shape == (2, 4, 8)
    assert torch.allclose(out[0, 0], torch.arange(8.0) * math.sqrt(8))  # TRM's sqrt(D) embedding scale
    assert out[0, 1:].abs().sum() == 0 and out[1].abs().sum() == 0  # other slots and the blank id: zeros


def test_sign_update_touches_only_the_rows_used():
    emb = _table(1000, 16, 2).train()
    emb.weights[7] = 1.0
    ids = torch.tensor([7, 7, 42, 0])
    out = emb({"puzzle_id": ids})
    # row 7 appears twice: the gradients of the two rows are summed before the sign
    (out[:, 0] * torch.tensor([1.0, -3.0, 2.0, 5.0]).view(-1, 1)).sum().backward()
    before = emb.weights.clone()
    held = emb.sign_update(lr=0.01, weight_decay=0.1)
    changed = (emb.weights != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [7, 42]  # the blank id 0 is never trained, the other 997 rows untouched
    # row 7: decay then step against sign(1 - 3) = -1; row 42: 0 - lr * sign(+2)
    assert torch.allclose(emb.weights[7], torch.full((16,), 1.0 * (1 - 0.01 * 0.1) + 0.01))
    assert torch.allclose(emb.weights[42], torch.full((16,), -0.01))
    # what the update held is proportional to the 4 rows touched, not to the 1000-row table
    assert 0 < held < 4 * 16 * 4 * 4 < emb.weights.numel() * 4
    assert emb.sign_update(0.01, 0.1) == 0  # nothing pending any more


def test_gather_sums_gradients_over_ranks():
    emb = _table(5, 4, 1).train()
    emb({"puzzle_id": torch.tensor([2])})[:, 0].sum().backward()  # gradient +sqrt(4) = +2 from this rank
    other_rank = (torch.tensor([2, 2]), torch.full((2, 4), -1.5))  # -3 from the other ranks
    gathered = iter(other_rank)
    emb.sign_update(0.5, 0.0, gather=lambda t: torch.cat([t, next(gathered)]))
    assert torch.allclose(emb.weights[2], torch.full((4,), 0.5))  # sign(2 - 3) = -1 -> +lr


def test_out_of_range_id_is_an_error():
    with pytest.raises(IndexError, match=r"puzzle ids must be in \[0, 5\)"):
        _table(5, 4, 1)({"puzzle_id": torch.tensor([5])})
