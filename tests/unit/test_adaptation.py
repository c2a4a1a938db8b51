"""Test-time adaptation on the pure model: reset per task, only the chosen parameters move, the objective falls."""

from __future__ import annotations

import pytest
import torch

from trm_lightning.adaptation import (
    AdaptationConfig,
    Finetuner,
    adapt_context_group,
    adapt_contexts,
    deep_supervision_loss,
)
from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.models.conditioning import ConditionerShape
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.models.encoder_trm import EncoderTRM
from trm_lightning.models.trm import TinyRecursiveModel

S, D, P = 6, 32, 2


@pytest.fixture(scope="module")
def dm(synthetic_task_dir, synthetic_eval_dir):
    dm = ARCDataModule(str(synthetic_task_dir), str(synthetic_eval_dir), canvas_size=S, max_demos=4,
                       global_batch_size=4, test_augmentations="dihedral")
    dm.setup()
    return dm


def _model() -> EncoderTRM:
    torch.manual_seed(0)
    shape = ConditionerShape(hidden_size=D, prefix_len=P, num_heads=4, canvas_size=S)
    trm = TinyRecursiveModel(seq_len=S * S, hidden_size=D, num_heads=4, num_layers=1, H_cycles=2, L_cycles=1,
                             prefix_len=P, halt_max_steps=2)
    return EncoderTRM(StandardDemoEncoder(shape, num_layers=1), trm).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_task_demos_read_no_test_output(dm):
    demos = dm.task_demos(0, dm.test_aug_indices[:3])
    assert (demos.full["labels"] == -100).all()  # the one row per version carries demos only
    task = dm.eval_tasks[0]
    assert demos.leave_one_out["inputs"].shape[0] == 3 * len(task.train)
    assert demos.leave_one_out["query_index"].tolist() == list(range(len(task.train))) * 3  # demo pairs as queries


def test_context_adaptation_is_reset_per_task_and_leaves_the_weights(dm):
    model, config = _model(), AdaptationConfig(methods=["context"], context_steps=4)
    before = _state(model)
    versions = dm.test_aug_indices[:2]
    alone, steps = adapt_contexts(model, dm.task_demos(1, versions), config)
    assert steps == 4
    adapt_contexts(model, dm.task_demos(0, versions), config)
    again, _ = adapt_contexts(model, dm.task_demos(1, versions), config)
    assert torch.equal(again, alone)  # A then B gives B what B alone gets
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        start = model.encode(dm.task_demos(1, versions).full)
    assert not torch.equal(alone, start)  # it moved from the encoder's context


def test_tasks_adapted_in_one_batch_get_what_each_gets_alone(dm):
    """Cross-task batching: each task's contexts equal those of adapting it alone (the same gradient, elementwise
    Adam), up to the rounding of a larger batch; the companions do not matter."""
    model = _model()
    config = AdaptationConfig(methods=["context"], context_steps=6, context_lr=0.05)
    versions = dm.test_aug_indices[:2]
    tasks = [0, 1, 2]
    group = adapt_context_group(model, [dm.task_demos(t, versions) for t in tasks], config)
    for t, (batched, steps) in zip(tasks, group):
        alone, alone_steps = adapt_contexts(model, dm.task_demos(t, versions), config)
        assert steps == alone_steps == 6 and batched.shape == alone.shape == (len(versions), *alone.shape[1:])
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            assert (batched - model.encode(dm.task_demos(t, versions).full)).abs().max() > 1e-2  # it did move
    other = adapt_context_group(model, [dm.task_demos(t, versions) for t in (2, 1)], config)
    torch.testing.assert_close(other[1][0], group[1][0], rtol=1e-4, atol=1e-5)  # task 1 with other companions


def test_context_steps_lower_the_demo_loss(dm):
    model = _model()
    demos = dm.task_demos(2, dm.test_aug_indices[:2])
    with torch.no_grad():
        start = model.encode(demos.full)
        before = deep_supervision_loss(model, demos.leave_one_out, start[demos.version_of_row])
    adapted, _ = adapt_contexts(model, demos, AdaptationConfig(methods=["context"], context_steps=16, context_lr=0.05))
    with torch.no_grad():
        after = deep_supervision_loss(model, demos.leave_one_out, adapted[demos.version_of_row])
    assert after < before


@pytest.mark.parametrize("which, moved, kept", [("encoder", "conditioner", "trm"), ("trm", "trm", "conditioner")])
def test_finetune_moves_only_the_chosen_parameters_and_restores_them(dm, which, moved, kept):
    model = _model()
    before = _state(model)
    tuner = Finetuner(model, AdaptationConfig(methods=["finetune"], finetune_steps=2, finetune_lr=1e-2,
                                              finetune_params=which))
    with tuner.adapted(dm.task_demos(0, dm.test_aug_indices[:2])) as steps:
        assert steps == 2
        inside = _state(model)
    changed = {k for k in before if not torch.equal(before[k], inside[k])}
    assert changed and all(k.startswith(moved) for k in changed)
    assert all(torch.equal(inside[k], before[k]) for k in before if k.startswith(kept))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored, bit for bit


def test_finetune_is_reset_per_task(dm):
    config = AdaptationConfig(methods=["finetune"], finetune_steps=2, finetune_lr=1e-2)
    versions = dm.test_aug_indices[:2]
    model = _model()
    tuner = Finetuner(model, config)
    with tuner.adapted(dm.task_demos(1, versions)):
        alone = _state(model)
    with tuner.adapted(dm.task_demos(0, versions)):
        pass
    with tuner.adapted(dm.task_demos(1, versions)):
        again = _state(model)
    assert all(torch.equal(again[k], alone[k]) for k in alone)


def test_bad_adaptation_values_are_refused():
    with pytest.raises(ValueError, match="model.adaptation.context_steps must be >= 1"):
        AdaptationConfig(methods=["context"], context_steps=0)
    with pytest.raises(ValueError, match="lists a method twice"):
        AdaptationConfig(methods=["context", "context"])
