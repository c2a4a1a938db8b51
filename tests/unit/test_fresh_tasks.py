"""Training on tasks generated on the fly (``data.fresh_tasks``): the task stream is a pure function of (seed, index)
over the training rules only, an epoch visits new tasks (never a repeat), keys are a pure function of (seed, epoch),
a mid-epoch resume continues with the same keys, and evaluation tasks that a training rule explains are refused."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.data.episodes import EpisodeDataset, EpisodeLoader
from trm_lightning.data.fewshot_rules import (
    RuleTaskStream,
    explaining_rules,
    sibling_rules,
    make_fewshot_split,
    rule_of,
    split_rules,
)
from trm_lightning.data.fresh_tasks import FreshTasks, FreshTaskSampler
from trm_lightning.data.task_json import write_task_dir
from trm_lightning.errors import ConfigError

FAMILIES = ["recolour", "gravity", "tile", "fill"]


def _same(a, b) -> bool:
    return a.task_id == b.task_id and a.source == b.source and all(
        np.array_equal(x, y) for (ai, ao), (bi, bo) in zip(a.train + a.test, b.train + b.test) for x, y in ((ai, bi), (ao, bo))
    )


def _stream(seed=0, per_epoch=10, **kwargs) -> RuleTaskStream:
    return FreshTasks(families=FAMILIES, **kwargs).stream(per_epoch, seed)


def test_stream_is_a_pure_function_of_seed_and_index_over_training_rules_only():
    train, heldout = split_rules(FAMILIES)
    stream = _stream()
    tasks = [stream[g] for g in range(2 * len(train))]
    again = _stream()
    assert all(_same(t, again[g]) for g, t in zip(reversed(range(len(tasks))), reversed(tasks)))  # any order
    assert not _same(_stream(seed=1)[0], tasks[0])
    assert len({t.task_id for t in tasks}) == len(tasks) and tasks[3].task_id == "gen_000000003"
    # every block of len(train) indices holds every training rule once; no held-out rule, none explains a task
    for block in range(2):
        rules = [rule_of(t) for t in tasks[block * len(train) : (block + 1) * len(train)]]
        assert Counter(rules) == {r: 1 for r in train}
    for task in tasks:
        assert rule_of(task) not in heldout
        assert not explaining_rules(task, heldout)
        assert len(task.train) == 3 and len(task.test) == 1 and task.max_side <= 6
        for inp, out in task.train + task.test:
            assert np.array_equal(rule_of(task).apply(inp), out) and not np.array_equal(inp, out)
    assert len(stream) == 10
    with pytest.raises(IndexError):
        stream[-1]


def test_sampler_epochs_visit_new_tasks_deterministically_and_split_across_ranks():
    stream = _stream(per_epoch=12)
    ds = EpisodeDataset(stream, canvas_size=8, max_demos=3)
    sampler = FreshTaskSampler(ds, stream, 12, seed=3)
    first = list(sampler)
    assert [k.task_index for k in first] == list(range(12)) and len(sampler) == 12
    assert list(FreshTaskSampler(ds, stream, 12, seed=3)) == first
    seen = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        indices = {k.task_index for k in sampler}
        assert indices == set(range(12 * epoch, 12 * (epoch + 1)))
        assert not indices & seen  # never a task of an earlier epoch
        seen |= indices
    sampler.set_epoch(0)
    assert list(sampler) == first
    ranks = [list(FreshTaskSampler(ds, stream, 12, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert ranks[0] == first[0::2] and ranks[1] == first[1::2]
    loo = list(FreshTaskSampler(ds, stream, 400, seed=3, leave_one_out_prob=0.5))
    share = sum(k.leave_one_out for k in loo) / len(loo)
    assert 0.4 < share < 0.6 and all(0 <= k.query_index < 3 for k in loo if k.leave_one_out)
    # an episode is a pure function of its key
    a, b = ds[first[5]], EpisodeDataset(_stream(per_epoch=12), canvas_size=8, max_demos=3)[first[5]]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sibling_groups_share_every_grid_and_differ_only_in_the_operation():
    train, heldout = split_rules(FAMILIES)
    stream = _stream(per_epoch=12, siblings=3)
    tasks = [stream[g] for g in range(3 * len(train))]
    again = _stream(per_epoch=12, siblings=3)
    assert all(_same(t, again[g]) for g, t in zip(reversed(range(len(tasks))), reversed(tasks)))  # any order
    assert [t.task_id for t in tasks[:3]] == ["gen_000000000", "gen_000000001", "gen_000000002"]
    assert Counter(rule_of(t) for t in tasks[0::3]) == {r: 1 for r in train}  # every rule leads one group per block
    differ = 0
    for g in range(len(train)):
        group = tasks[3 * g : 3 * g + 3]
        rules = [rule_of(t) for t in group]
        assert rules[1:] and all(r in sibling_rules(rules[0], train) for r in rules[1:])
        lead = rules[0]
        same_c = [r for r in train if r.family == lead.family and r.c == lead.c and r != lead]
        if same_c:  # the same family and colour, another operation
            assert all(r.family == lead.family and r.c == lead.c and r.s != lead.s for r in rules[1:])
        for task, rule in zip(group, rules):
            assert rule not in heldout and not explaining_rules(task, heldout)
            assert len(task.train) == 3 and len(task.test) == 1
            for (inp, out), (lead_inp, _) in zip(task.train + task.test, group[0].train + group[0].test):
                assert np.array_equal(inp, lead_inp)  # the same grids in every task of the group
                assert np.array_equal(rule.apply(inp), out) and not np.array_equal(inp, out)
        differ += any(not np.array_equal(a[1], b[1]) for a, b in zip(group[0].test, group[1].test))
    assert differ >= 0.8 * len(train)  # the query is the same, its answer is not
    # siblings keep their queries together: the same draws, so the same query slot and leave-one-out choice
    ds = EpisodeDataset(stream, canvas_size=8, max_demos=3)
    keys = list(FreshTaskSampler(ds, stream, 12, seed=3, leave_one_out_prob=0.5))
    assert [k.task_index for k in keys] == list(range(12))
    for g in range(4):
        assert len({(k.query_index, k.leave_one_out) for k in keys[3 * g : 3 * g + 3]}) == 1
    assert len({(k.query_index, k.leave_one_out) for k in keys}) > 1
    # one task per group: the stream of independent tasks, as before
    assert all(_same(a, b) for a, b in zip((_stream(siblings=1)[g] for g in range(8)), (_stream()[g] for g in range(8))))
    with pytest.raises(ConfigError, match="siblings"):
        FreshTasks(families=FAMILIES, siblings=0).check()


def test_loader_resumes_mid_epoch_with_the_same_keys():
    stream = _stream(per_epoch=16)
    ds = EpisodeDataset(stream, canvas_size=8, max_demos=3)

    def loader(done: list[int]) -> EpisodeLoader:
        return EpisodeLoader(ds, batch_size=4, sampler=FreshTaskSampler(ds, stream, 16, seed=1), drop_last=True,
                             progress=lambda: done[0])

    done = [0]
    full = loader(done)
    full.sampler.set_epoch(2)
    reference = [b["task_index"].tolist() for b in full]
    done[0] = 2
    state = full.state_dict()
    resumed = loader([0])
    resumed.load_state_dict(state)
    assert [b["task_index"].tolist() for b in resumed] == reference[2:]
    assert reference[0][0] == 32  # epoch 2 starts at task 2 * 16


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory):
    train, heldout = make_fewshot_split(20, 12, seed=0, families=FAMILIES)
    root = tmp_path_factory.mktemp("fresh")
    return write_task_dir(train, root / "train"), write_task_dir(heldout, root / "heldout")


def _dm(dirs, **kwargs) -> ARCDataModule:
    args = dict(train_source=str(dirs[0]), eval_source=str(dirs[1]), canvas_size=8, max_demos=3, global_batch_size=4,
                episodes_per_epoch=8, num_train_augmentations=1, val_seen_puzzles=0,
                fresh_tasks=FreshTasks(families=FAMILIES))
    args.update(kwargs)
    return ARCDataModule(**args)


def test_datamodule_trains_on_fresh_tasks_and_stores_them_as_plain_data(split_dirs):
    dm = _dm(split_dirs)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, FreshTaskSampler)
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([int(t) for b in loader for t in b["task_index"]])
    assert epochs == [list(range(8)), list(range(8, 16))]
    batch = next(iter(loader))
    assert not batch["puzzle_id"].any()  # fresh tasks are not in the puzzle-id table
    assert dm.hparams["fresh_tasks"] == {"families": FAMILIES, "heldout_fraction": 0.25, "split_seed": 0,
                                         "n_demos": 3, "n_test": 1, "min_side": 3, "max_side": 6, "siblings": 1}
    again = ARCDataModule(**dict(dm.hparams))  # what load_from_checkpoint does
    assert again.fresh_tasks == dm.fresh_tasks
    assert dm.data_summary["fresh_tasks"] == len(split_rules(FAMILIES)[0])


def test_datamodule_refuses_evaluation_tasks_a_training_rule_explains(split_dirs):
    # another split seed: some of these held-out tasks follow rules that split trains on
    with pytest.raises(ConfigError, match="follows the training rule"):
        _dm(split_dirs, fresh_tasks=FreshTasks(families=FAMILIES, split_seed=1)).setup()
    with pytest.raises(ConfigError, match="exclude each other"):
        _dm(split_dirs, train_on_eval_demos=True)
    with pytest.raises(ConfigError, match="does not fit"):
        _dm(split_dirs, canvas_size=5)
    with pytest.raises(ConfigError, match="families"):
        _dm(split_dirs, fresh_tasks=FreshTasks(families=["crop"]))
