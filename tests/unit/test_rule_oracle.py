"""RulePartOracle (the factorised rule oracle of the few-shot benchmark): it reads the operation and the colour of
the rule a row's demos show, held-out rules included, and its context is their two learned vectors."""

from __future__ import annotations

import pytest
import torch

from trm_lightning.data.episodes import EpisodeDataset, EpisodeKey
from trm_lightning.data.fewshot_rules import make_fewshot_split, rule_of
from trm_lightning.models.conditioning import ConditionerShape
from trm_lightning.rule_oracle import RulePartOracle

FAMILIES = ["outline", "gravity", "recolour", "tile"]


def _batch(tasks):
    ds = EpisodeDataset(tasks, canvas_size=8, max_demos=3)
    items = [ds[EpisodeKey(i, 0, 0, False)] for i in range(len(tasks))]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def test_oracle_reads_the_rule_parts_of_training_and_heldout_rules():
    train, heldout = make_fewshot_split(40, 20, seed=0, families=FAMILIES)
    oracle = RulePartOracle(ConditionerShape(hidden_size=16, prefix_len=4, canvas_size=8), families=FAMILIES)
    for tasks in (train, heldout):
        batch = _batch(tasks)
        ops, colours = oracle.rule_parts(batch["demo_inputs"], batch["demo_outputs"], batch["demo_mask"])
        assert [oracle.operations[o] for o in ops.tolist()] == [(rule_of(t).family, rule_of(t).s) for t in tasks]
        assert colours.tolist() == [rule_of(t).c for t in tasks]
    # the context: the operation's vector in slot 0, the colour's in slot 1, zeros after; rows of one rule agree
    batch = _batch(heldout)
    context = oracle(batch)
    assert context.shape == (len(heldout), 4, 16) and not context[:, 2:].any()
    first = rule_of(heldout[0])
    same_op = [i for i, t in enumerate(heldout) if (rule_of(t).family, rule_of(t).s) == (first.family, first.s)]
    same_c = [i for i, t in enumerate(heldout) if rule_of(t).c == first.c]
    assert len(same_op) >= 2 and torch.equal(context[same_op[0], 0], context[same_op[1], 0])
    assert len(same_c) >= 2 and torch.equal(context[same_c[0], 1], context[same_c[1], 1])
    # a row without demos gets the "unknown" vectors; the gradient reaches exactly the rows used
    batch["demo_mask"][0] = False
    context = oracle(batch)
    assert torch.equal(context[0, 0], oracle.operation[-1]) and torch.equal(context[0, 1], oracle.colour[-1])
    context.sum().backward()
    used = {rule_of(t).c for t in heldout[1:]}
    assert {int(c) for c in oracle.colour.grad.abs().sum(1).nonzero()} == used | {10}


def test_oracle_refuses_bad_settings():
    with pytest.raises(ValueError, match="prefix_len >= 2"):
        RulePartOracle(ConditionerShape(hidden_size=16, prefix_len=1))
    with pytest.raises(ValueError, match="families"):
        RulePartOracle(ConditionerShape(hidden_size=16, prefix_len=2), families=["crop"])
