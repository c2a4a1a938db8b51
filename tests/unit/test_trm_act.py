"""TRM core: recursion gradients, ACT carry reset semantics and halting rules."""

import torch

from trm_lightning.losses import act_loss, stablemax_log_probs
from trm_lightning.models.trm import ACTCarry, TinyRecursiveModel

S, D = 4, 32


def _trm(**kw):
    torch.manual_seed(0)
    args = dict(seq_len=S * S, hidden_size=D, num_heads=4, prefix_len=2, H_cycles=2, L_cycles=2, halt_max_steps=4)
    args.update(kw)
    return TinyRecursiveModel(**args)


def _batch(B, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(0, 12, (B, S * S), generator=g, dtype=torch.int32),
        "labels": torch.randint(0, 12, (B, S * S), generator=g).long(),
    }


def test_carry_reset_replaces_only_halted_rows():
    trm = _trm()
    b1, b2 = _batch(4, 1), _batch(4, 2)
    carry = trm.reset_carry(trm.initial_carry(b1), b1)
    assert torch.equal(carry.data["inputs"], b1["inputs"])  # everything loads on the first call
    y = torch.randn(4, 2 + S * S, D)
    z = torch.randn(4, 2 + S * S, D)
    carry = ACTCarry(
        y=y, z=z, steps=torch.tensor([3, 1, 4, 2], dtype=torch.int32),
        halted=torch.tensor([False, True, True, False]), data=carry.data,
    )
    new = trm.reset_carry(carry, b2)
    for row, was_halted in enumerate([False, True, True, False]):
        src = b2 if was_halted else b1
        assert torch.equal(new.data["inputs"][row], src["inputs"][row])
        assert torch.equal(new.data["labels"][row], src["labels"][row])
        if was_halted:
            assert new.steps[row] == 0
            assert torch.equal(new.y[row], trm.y_init.expand_as(y[row]))
            assert torch.equal(new.z[row], trm.z_init.expand_as(z[row]))
        else:
            assert new.steps[row] == carry.steps[row]
            assert torch.equal(new.y[row], y[row]) and torch.equal(new.z[row], z[row])
    assert not new.halted.any()


def test_halting_rules():
    trm = _trm(halt_max_steps=4, halt_exploration_prob=0.0)
    steps = torch.tensor([1, 1, 4, 2], dtype=torch.int32)
    q = torch.tensor([-1.0, 0.5, -3.0, -0.1])
    assert trm.halt(steps, q).tolist() == [False, True, True, False]
    trm.halt_exploration_prob = 1.0  # every row gets a minimum of U{2..4} steps: step 1 never halts
    torch.manual_seed(0)
    assert trm.halt(torch.tensor([1, 1], dtype=torch.int32), torch.tensor([5.0, 5.0])).tolist() == [False, False]
    assert trm.halt(torch.tensor([4, 4], dtype=torch.int32), torch.tensor([-5.0, -5.0])).tolist() == [True, True]


def test_only_last_cycle_has_gradient_and_carry_is_detached():
    trm = _trm()
    b = _batch(2, 0)
    carry = trm.reset_carry(trm.initial_carry(b), b)
    prefix = torch.randn(2, 2, D, requires_grad=True)
    x = trm.embed(b["inputs"], prefix)
    y, z, logits, q = trm(carry.y, carry.z, x)
    assert not y.requires_grad and not z.requires_grad
    out = act_loss(logits, b["labels"], q[:, 0])
    out.loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert trm.q_head.weight.grad.abs().sum() > 0
    assert q.dtype == torch.float32 and torch.allclose(q, torch.full_like(q, -5.0))  # q head starts at bias -5


def test_stablemax_matches_hand_computation():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    # s = [2, 1, 0.5], sum 3.5
    expected = torch.log(torch.tensor([[2 / 3.5, 1 / 3.5, 0.5 / 3.5]], dtype=torch.float64))
    got = stablemax_log_probs(logits)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected)
    # loss of label 1 is -log(1/3.5) = log(3.5)
    out = act_loss(logits[:, None, :].expand(1, 2, 3), torch.tensor([[1, -100]]), torch.tensor([0.0]), 0.0)
    assert abs(out.loss.item() - torch.log(torch.tensor(3.5)).item()) < 1e-6


def test_act_loss_row_quantities():
    logits = torch.full((2, 3, 4), -2.0)
    logits[0, :, 1] = 3.0  # row 0 predicts 1 everywhere
    logits[1, :, 2] = 3.0  # row 1 predicts 2 everywhere
    labels = torch.tensor([[1, 1, -100], [2, 1, 1]])
    out = act_loss(logits, labels, torch.tensor([0.0, 0.0]), q_halt_loss_weight=0.5)
    assert out.exact.tolist() == [True, False]
    assert torch.allclose(out.token_accuracy, torch.tensor([1.0, 1 / 3]))
    bce = torch.log(torch.tensor(2.0))  # BCE at logit 0 whatever the target
    assert torch.allclose(out.q_halt_loss, torch.stack([bce, bce]))
    assert torch.allclose(out.loss, (out.lm_loss + 0.5 * out.q_halt_loss).mean())


def test_stablemax_gradient_is_finite_at_one():
    # x = 1 exactly made the unselected branch 1/(1-x) infinite and its zero gradient NaN
    logits = torch.tensor([[[1.0, 0.0, -1.0, 3.0]]], requires_grad=True)
    out = act_loss(logits, torch.tensor([[2]]), torch.tensor([0.0]))
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_cell_and_row_weights_of_the_loss():
    """``cell_weight``: each row's cross-entropy is the weighted mean of its supervised cells (all ones: the plain
    mean); ``row_weight``: the weighted sum over rows instead of the mean."""
    from trm_lightning.losses import token_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[1, 4, -100], [2, 0, 3]])
    q = torch.tensor([0.3, -0.2])
    plain = act_loss(logits, labels, q)
    ones = act_loss(logits, labels, q, cell_weight=torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(ones.lm_loss, plain.lm_loss)
    weight = torch.tensor([[5.0, 1.0, 5.0], [1.0, 5.0, 1.0]], dtype=torch.float64)  # the ignored cell weighs nothing
    ce = token_cross_entropy(logits, labels).double()
    expected = torch.stack([(5 * ce[0, 0] + ce[0, 1]) / 6, (ce[1, 0] + 5 * ce[1, 1] + ce[1, 2]) / 7])
    torch.testing.assert_close(act_loss(logits, labels, q, cell_weight=weight).lm_loss, expected.float())
    rows = act_loss(logits, labels, q, row_weight=torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(rows.loss, (0.25 * (plain.lm_loss[0] + 0.5 * plain.q_halt_loss[0])
                                           + 0.75 * (plain.lm_loss[1] + 0.5 * plain.q_halt_loss[1])))


def test_changed_cell_weight_reaches_the_training_loss(tmp_path, synthetic_task_dir, synthetic_eval_dir, one_thread):
    """``model.changed_cell_weight``: the default 1 is TRM's loss bit for bit (the golden test pins it); another
    value changes the very first step's loss, and only the loss (same data, same random draws)."""
    import json

    from tests.integration.helpers import build_tiny

    records = {}
    for w in ("1.0", "4.0"):
        path = tmp_path / f"losses{w}.jsonl"
        cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path / f"runs{w}", "--trainer.max_steps=2",
                         "--trainer.limit_val_batches=0", f"--model.changed_cell_weight={w}",
                         "--trainer.callbacks+=tests.integration.helpers.LossRecorder", f"--trainer.callbacks.path={path}")
        cli.trainer.fit(cli.model, cli.datamodule)
        records[w] = [json.loads(line) for line in open(path)]
    plain, weighted = records["1.0"], records["4.0"]
    assert len(plain) == len(weighted) == 2
    assert abs(weighted[0]["loss"] - plain[0]["loss"]) > 1e-3 * plain[0]["loss"]
    assert [r["rand"] for r in plain] == [r["rand"] for r in weighted]
