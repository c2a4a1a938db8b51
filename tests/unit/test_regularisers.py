"""The demo-subset contrastive loss (``model.context_contrastive_weight``): subsets are disjoint and non-empty, the
InfoNCE leaves same-task rows out of the negatives, and optimising it makes an encoder's contexts of one task's two
demo subsets find each other (the retrieval it rewards), while the training step with weight 0 stays untouched."""

from __future__ import annotations

import pytest
import torch

from tests.integration.helpers import build_tiny, run_tiny
from trm_lightning.errors import ConfigError
from trm_lightning.models.conditioning import ConditionerShape
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.regularisers import contrastive_views, demo_subset_contrastive_loss, demo_subsets, info_nce


def test_demo_subsets_are_disjoint_non_empty_and_cover_the_valid_demos():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    cuts = set()
    for seed in range(40):
        a, b = demo_subsets(mask, torch.Generator().manual_seed(seed))
        for row in (0, 2, 4):
            assert a[row].any() and b[row].any() and not (a[row] & b[row]).any()
            assert torch.equal(a[row] | b[row], mask[row])
        assert torch.equal(a[1], mask[1]) and torch.equal(b[1], mask[1])  # one demo: both views see it
        assert not a[3].any() and not b[3].any()
        cuts.add(int(a[2].sum()))
    assert cuts == {1, 2, 3}  # every cut of four demos occurs
    again = demo_subsets(mask, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(again, demo_subsets(mask, torch.Generator().manual_seed(7))))


def test_info_nce_rewards_matching_rows_and_ignores_same_group_negatives():
    torch.manual_seed(0)
    a = torch.randn(6, 10)
    assert info_nce(a, a, torch.arange(6), 0.1) < info_nce(a, a.roll(1, 0), torch.arange(6), 0.1)
    # rows 0 and 1 of one group: with b's row 1 a copy of row 0, row 0 is not penalised for matching it
    b = a.clone()
    b[1] = a[0]
    ungrouped = info_nce(a, b, torch.arange(6), 0.1)
    grouped = info_nce(a, b, torch.tensor([0, 0, 1, 2, 3, 4]), 0.1)
    assert grouped < ungrouped


def test_optimising_the_loss_makes_demo_subsets_of_a_task_retrieve_each_other():
    S, D, B, K = 6, 32, 8, 4
    torch.manual_seed(0)
    encoder = StandardDemoEncoder(ConditionerShape(hidden_size=D, prefix_len=2, num_heads=4, canvas_size=S), num_layers=1)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(2, 12, (B, K, S * S), generator=g, dtype=torch.int32)
    # a task = a colour map applied to random grids: its demos share the map, not the grids
    maps = torch.stack([torch.randperm(10, generator=g) + 2 for _ in range(B)])
    outputs = torch.stack([maps[i][(inputs[i] - 2).long()] for i in range(B)]).to(torch.int32)
    batch = {"demo_inputs": inputs, "demo_outputs": outputs, "demo_mask": torch.ones(B, K, dtype=torch.bool),
             "task_index": torch.arange(B)}

    def held_out_loss() -> float:  # over subset draws training never used
        with torch.no_grad():
            return sum(float(demo_subset_contrastive_loss(encoder, batch, 0.1, torch.Generator().manual_seed(1000 + i)))
                       for i in range(4)) / 4

    def retrieval() -> float:  # the share of rows whose subset-A context is nearest to their own subset-B context
        with torch.no_grad():
            a, b = demo_subsets(batch["demo_mask"], torch.Generator().manual_seed(99))
            ca = torch.nn.functional.normalize(encoder({**batch, "demo_mask": a}).flatten(1), dim=-1)
            cb = torch.nn.functional.normalize(encoder({**batch, "demo_mask": b}).flatten(1), dim=-1)
            return float(((ca @ cb.T).argmax(1) == torch.arange(B)).float().mean())

    before, retrieved = held_out_loss(), retrieval()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    for step in range(100):
        loss = demo_subset_contrastive_loss(encoder, batch, 0.1, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.25 * before
    assert retrieval() >= 0.875 > retrieved


def test_training_with_the_loss_logs_it_and_refuses_a_conditioner_without_demos(
    synthetic_task_dir, synthetic_eval_dir, tmp_path
):
    cli = run_tiny("fit", synthetic_task_dir, synthetic_eval_dir, tmp_path, "--model.context_contrastive_weight=0.5",
                   "--trainer.max_steps=2", "--trainer.log_every_n_steps=1")
    assert "train/contrastive_loss" in cli.trainer.logged_metrics
    assert float(cli.trainer.logged_metrics["train/contrastive_loss"]) > 0
    with pytest.raises(ConfigError, match="needs a conditioner that reads the demos"):
        build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--model.context_contrastive_weight=0.5",
                   "--model.conditioner=PuzzleEmbedding")
    with pytest.raises(ConfigError, match="temperature"):
        build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--model.context_contrastive_temperature=0")


@pytest.mark.parametrize("test_conditioning", [False, True])
def test_views_from_one_encoding_equal_encoding_each_subset_again(test_conditioning):
    """``encode_views`` (the demos encoded once, the set encoder once per view) gives the contexts and the gradients
    of encoding the batch once per demo subset, including a row whose view keeps no demo."""
    S, D, B, K = 5, 32, 5, 3
    torch.manual_seed(0)
    encoder = StandardDemoEncoder(ConditionerShape(hidden_size=D, prefix_len=2, num_heads=4, canvas_size=S),
                                  num_layers=1, test_conditioning=test_conditioning)
    g = torch.Generator().manual_seed(3)
    batch = {"demo_inputs": torch.randint(2, 12, (B, K, S * S), generator=g, dtype=torch.int32),
             "demo_outputs": torch.randint(2, 12, (B, K, S * S), generator=g, dtype=torch.int32),
             "demo_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool),
             "inputs": torch.randint(2, 12, (B, S * S), generator=g, dtype=torch.int32)}
    a, b = demo_subsets(batch["demo_mask"], torch.Generator().manual_seed(5))
    b = b.clone()
    b[4] = False  # a view with no demo at all

    def grads(contexts):
        encoder.zero_grad()
        sum((c * torch.randn(c.shape, generator=torch.Generator().manual_seed(i))).sum()
            for i, c in enumerate(contexts)).backward()
        return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    shared = encoder.encode_views(batch, [a, b])
    separate = [encoder(batch), encoder({**batch, "demo_mask": a}), encoder({**batch, "demo_mask": b})]
    for x, y in zip(shared, separate):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    shared_grads, separate_grads = grads(encoder.encode_views(batch, [a, b])), grads(separate)
    assert shared_grads.keys() == separate_grads.keys() == {n for n, _ in encoder.named_parameters()}
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], separate_grads[name], rtol=1e-4, atol=1e-5)  # summation order
    with pytest.raises(ValueError, match="invalid"):
        encoder.encode_views(batch, [torch.ones(B, K, dtype=torch.bool)])


def test_the_training_step_takes_the_loss_from_the_act_step_views(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    """The module's contrastive term is InfoNCE of the two subset contexts that ``act_step`` returned, and those are
    the contexts the conditioner gives each subset on its own."""
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--model.context_contrastive_weight=0.5")
    lit, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    carry = lit.model.initial_carry(batch)
    seen = []

    def views(data):
        seen.append(contrastive_views(data))
        return seen[-1]

    carry, out = lit.model.act_step(carry, batch, views)
    (a, b), = seen
    assert len(out.views) == 2
    torch.testing.assert_close(out.views[0], lit.model.encode({**carry.data, "demo_mask": a}), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.views[1], lit.model.encode({**carry.data, "demo_mask": b}), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.context, lit.model.encode(carry.data), rtol=1e-5, atol=1e-6)
    assert lit.model.act_step(lit.model.initial_carry(batch), batch)[1].views == ()
