import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.data.episodes import EpisodeDataset, EpisodeSampler
from trm_lightning.data.synthetic import make_synthetic_tasks
from trm_lightning.data.task_json import task_to_json, write_task_dir
from trm_lightning.errors import ConfigError


def _dm(train, evaluation, **kwargs):
    kwargs.setdefault("canvas_size", 6)
    kwargs.setdefault("global_batch_size", 8)
    kwargs.setdefault("max_demos", 4)
    return ARCDataModule(train_source=str(train), eval_source=str(evaluation), **kwargs)


def test_setup_on_synthetic_dirs(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir, val_seen_puzzles=0)
    dm.setup()
    assert [t.task_id for t in dm.train_tasks] == [f"syn{i:03d}" for i in range(12)]
    assert [t.task_id for t in dm.eval_tasks] == [f"evl{i:03d}" for i in range(6)]
    s = dm.data_summary
    assert (s["train_too_large"], s["train_without_demos"], s["train_shared_with_eval"]) == (0, 0, 0)
    assert (s["train_tasks"], s["eval_tasks"], s["eval_queries"]) == (12, 6, 6)
    first = dm.train_tasks
    dm.setup("validate")  # idempotent
    assert dm.train_tasks is first
    assert dm.local_batch_size == 8
    assert dm.episodes_per_epoch == 16  # 12 test pairs rounded up to a multiple of 8
    assert len(dm.val_dataloader()) == 1  # val_seen_puzzles=0: no val_seen view


def test_firewall_drops_tasks_shared_with_eval(tmp_path, synthetic_task_dir, synthetic_eval_dir, synthetic_eval_tasks):
    train_dir = tmp_path / "train"
    shutil.copytree(synthetic_task_dir, train_dir)
    # same content under another id
    (train_dir / "copy_of_evl002.json").write_text(json.dumps(task_to_json(synthetic_eval_tasks[2])))
    # same id, other content
    other = make_synthetic_tasks(1, seed=99, prefix="x")[0]
    (train_dir / "evl004.json").write_text(json.dumps(task_to_json(other)))
    # one shared pair is enough
    partial = task_to_json(make_synthetic_tasks(1, seed=98, prefix="y")[0])
    partial["train"][1] = task_to_json(synthetic_eval_tasks[5])["test"][0]
    (train_dir / "partial.json").write_text(json.dumps(partial))

    dm = _dm(train_dir, synthetic_eval_dir)
    dm.setup()
    s = dm.data_summary
    assert s["train_loaded"] == 15
    assert (s["train_shared_with_eval"], s["train_shared_by_id"], s["train_shared_by_content"]) == (3, 1, 2)
    assert [t.task_id for t in dm.train_tasks] == [f"syn{i:03d}" for i in range(12)]


def test_max_train_puzzles(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir, max_train_puzzles=5, puzzle_subset_seed=3)
    dm.setup()
    ids = [t.task_id for t in dm.train_tasks]
    assert len(ids) == 5 and ids == sorted(ids)
    again = _dm(synthetic_task_dir, synthetic_eval_dir, max_train_puzzles=5, puzzle_subset_seed=3)
    again.setup()
    assert [t.task_id for t in again.train_tasks] == ids
    other = _dm(synthetic_task_dir, synthetic_eval_dir, max_train_puzzles=5, puzzle_subset_seed=4)
    other.setup()
    assert [t.task_id for t in other.train_tasks] != ids

    too_many = _dm(synthetic_task_dir, synthetic_eval_dir, max_train_puzzles=13)
    with pytest.raises(ConfigError, match="max_train_puzzles=13 but only 12 training tasks fit canvas 6"):
        too_many.setup()


def test_canvas_and_demo_drops_are_counted(tmp_path):
    tasks = make_synthetic_tasks(20, seed=7, min_side=2, max_side=7, n_train=2, prefix="big")
    too_large = sum(t.max_side > 6 for t in tasks)
    assert 0 < too_large < 20
    train_dir = write_task_dir(tasks, tmp_path / "train")
    (train_dir / "nodemos.json").write_text(json.dumps({"train": [], "test": [{"input": [[1]], "output": [[1]]}]}))
    (train_dir / "noanswer.json").write_text(
        json.dumps({"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]]}]})
    )
    eval_tasks = make_synthetic_tasks(8, seed=8, min_side=2, max_side=7, n_train=2, prefix="e")
    eval_too_large = sum(t.max_side > 6 for t in eval_tasks)
    assert 0 < eval_too_large < 8
    eval_dir = write_task_dir(eval_tasks, tmp_path / "ev")
    dm = _dm(train_dir, eval_dir, canvas_size=6)
    dm.setup()
    s = dm.data_summary
    assert (s["train_too_large"], s["train_without_demos"], s["train_without_query"]) == (too_large, 1, 1)
    assert s["train_tasks"] == 20 - too_large
    assert all(t.max_side <= 6 for t in dm.train_tasks + dm.eval_tasks)
    assert (s["eval_too_large"], s["eval_tasks"]) == (eval_too_large, 8 - eval_too_large)

    with pytest.raises(ConfigError, match="no training tasks left"):
        _dm(train_dir, eval_dir, canvas_size=2).setup()


def test_max_eval_puzzles_takes_the_first(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir, max_eval_puzzles=2)
    dm.setup()
    assert [t.task_id for t in dm.eval_tasks] == ["evl000", "evl001"]


def test_train_dataloader_batch(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir, episodes_per_epoch=24, translate=True)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpisodeSampler) and loader.drop_last
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    batch = batches[0]
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
    assert shapes == {
        "demo_inputs": ((8, 4, 36), torch.int32),
        "demo_outputs": ((8, 4, 36), torch.int32),
        "demo_mask": ((8, 4), torch.bool),
        "inputs": ((8, 36), torch.int32),
        "labels": ((8, 36), torch.int64),
        "task_index": ((8,), torch.int64),
        "aug_index": ((8,), torch.int64),
        "query_index": ((8,), torch.int64),
        "puzzle_id": ((8,), torch.int64),
    }
    assert batch["demo_mask"].sum(1).tolist() == [3] * 8
    # every task appears twice in 24 episodes over 12 tasks
    seen = torch.cat([b["task_index"] for b in batches])
    assert torch.bincount(seen, minlength=12).tolist() == [2] * 12


def test_world_size_splits_the_batch(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert dm.local_batch_size == 4
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.batch_size) == (2, 1, 4)
    assert len(loader) == 2  # 16 episodes, 8 on this rank
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ConfigError, match="global_batch_size=8 does not divide by the world size"):
        dm.local_batch_size


def test_episodes_per_epoch_below_batch(synthetic_task_dir, synthetic_eval_dir):
    with pytest.raises(ConfigError, match="less than global_batch_size"):
        _dm(synthetic_task_dir, synthetic_eval_dir, episodes_per_epoch=4).train_dataloader()


def test_val_and_test_dataloaders(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(
        synthetic_task_dir,
        synthetic_eval_dir,
        val_seen_puzzles=5,
        val_augmentations=3,
        test_augmentations=4,
        num_train_augmentations=100,
        eval_batch_size=5,
    )
    val, seen = dm.val_dataloader()
    assert len(val.dataset) == 6 * 3 and val.batch_size == 5
    batch = next(iter(val))
    assert batch["aug_index"].tolist() == [0, 1, 2, 0, 1]
    assert batch["task_index"].tolist() == [0, 0, 0, 1, 1]
    assert len(seen.dataset) == 5 * 3
    seen_augs = {int(b) for batch in seen for b in batch["aug_index"]}
    assert seen_augs == {100, 101, 102}
    chosen = dm.val_seen_task_indices()
    assert len(chosen) == 5 and chosen == sorted(chosen)
    assert {int(t) for batch in seen for t in batch["task_index"]} == set(chosen)
    assert len(dm.test_dataloader().dataset) == 6 * 4  # test votes over its own augmentation count

    only = _dm(synthetic_task_dir, synthetic_eval_dir, val_seen_puzzles=0)
    loaders = only.val_dataloader()
    assert len(loaders) == 1


def test_queries_of_both_splits_as_episodes_batch_and_loader(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir, num_train_augmentations=3, train_on_eval_demos=True,
             eval_batch_size=4)
    train = dm.queries("train", [0, 5])
    assert [(k.task_index, k.query_index, k.aug_index) for k in train.keys] == [
        (t, 0, a) for t in range(12) for a in (0, 5)]
    rows = train.batch()
    # trained versions carry their row of the table, versions beyond num_train_augmentations the blank id
    assert rows["puzzle_id"].tolist() == [1 + t * 3 if a == 0 else 0 for t in range(12) for a in (0, 5)]
    first = train.batch(3)
    assert first["inputs"].shape[0] == 3
    for key in rows:
        assert torch.equal(first[key], torch.stack([train[i][key] for i in range(3)]))
    # evaluation tasks follow the training tasks in the table (TRM protocol on)
    held = dm.queries("eval", [1]).batch()
    assert held["task_index"].tolist() == list(range(6))
    assert held["puzzle_id"].tolist() == [1 + (12 + t) * 3 + 1 for t in range(6)]
    # a subset keeps its indices into the whole split
    some = dm.queries("train", [0], task_indices=[7, 2])
    assert [k.task_index for k in some.keys] == [2, 7]
    loader = dm.query_loader("eval", [0, 1])
    assert loader.batch_size == 4 and len(loader.dataset) == 12
    for key, value in next(iter(loader)).items():
        assert torch.equal(value, dm.queries("eval", [0, 1]).batch(4)[key])
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        dm.queries("test", [0])
    off = _dm(synthetic_task_dir, synthetic_eval_dir, num_train_augmentations=3)
    assert off.queries("eval", [0]).batch()["puzzle_id"].eq(0).all()  # held-out tasks: never in the table


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canvas_size": 0}, "data.canvas_size must be >= 1, got 0"),
        ({"max_train_puzzles": 0}, "data.max_train_puzzles must be >= 1 or None, got 0"),
        ({"leave_one_out_prob": 2.0}, "data.leave_one_out_prob must be in [0.0, 1.0], got 2.0"),
        ({"leave_one_out_prob": float("nan")}, "data.leave_one_out_prob must be a finite number, got nan"),
        ({"val_augmentations": 0}, "data.val_augmentations must be >= 1, got 0"),
        ({"puzzle_subset_seed": -1}, "data.puzzle_subset_seed must be >= 0, got -1"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError) as info:
        ARCDataModule(**kwargs)
    assert str(info.value) == message


def test_datamodule_and_episodes_share_their_argument_checks():
    # the same rule and the same line whichever of the two is given the bad value (the datamodule names its key)
    tasks = make_synthetic_tasks(2)
    for build, key in ((lambda: ARCDataModule(max_demos=0), "data.max_demos"),
                       (lambda: EpisodeDataset(tasks, canvas_size=6, max_demos=0), "max_demos")):
        with pytest.raises(ConfigError, match=rf"^{key} must be >= 1, got 0$"):
            build()
    dataset = EpisodeDataset(tasks, canvas_size=6, max_demos=3)
    with pytest.raises(ConfigError, match=r"^leave_one_out_prob must be in \[0.0, 1.0\], got -0.5$"):
        EpisodeSampler(dataset, tasks, 4, leave_one_out_prob=-0.5)
    with pytest.raises(ConfigError, match=r"^data.leave_one_out_prob must be in \[0.0, 1.0\], got -0.5$"):
        ARCDataModule(leave_one_out_prob=-0.5)


def test_real_arc1_at_canvas_10():
    dm = ARCDataModule("arc1/training", "arc1/evaluation", canvas_size=10, global_batch_size=8, max_demos=3)
    dm.setup()
    s = dm.data_summary
    assert (s["train_tasks"], s["train_too_large"], s["train_shared_with_eval"]) == (178, 222, 0)
    assert (s["eval_tasks"], s["eval_too_large"]) == (77, 323)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (8, 100) and batch["demo_inputs"].shape == (8, 3, 100)
    assert int(batch["inputs"].max()) <= 11


def test_real_firewall_counts():
    dm = ARCDataModule("arc2/training", "arc1/evaluation", canvas_size=30)
    dm.setup()
    s = dm.data_summary
    # ARC-AGI-2 training holds 376 of the 400 ARC-AGI-1 evaluation tasks (same ids)
    assert (s["train_shared_by_id"], s["train_shared_by_content"], s["train_tasks"]) == (376, 0, 624)
    dm = ARCDataModule("arc1/training", "arc1/evaluation", canvas_size=30)
    dm.setup()
    # ARC-AGI-1 training 40853293 has the same pairs as evaluation 070dd51e
    assert dm.data_summary["train_shared_by_content"] == 1
    assert "40853293" not in {t.task_id for t in dm.train_tasks}


def test_puzzle_ids_name_task_and_augmentation(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(synthetic_task_dir, synthetic_eval_dir, episodes_per_epoch=24, num_train_augmentations=5)
    assert dm.num_puzzle_ids == 1 + 12 * 5  # the blank id, then 5 versions of each of the 12 training tasks
    batch = next(iter(dm.train_dataloader()))
    expected = 1 + batch["task_index"] * 5 + batch["aug_index"]
    assert torch.equal(batch["puzzle_id"], expected)
    # without the TRM protocol the held-out tasks are unknown to the table: the blank id
    val = next(iter(dm.val_dataloader()[0]))
    assert val["puzzle_id"].eq(0).all()


def test_train_on_eval_demos_reads_eval_demos_never_eval_test_outputs(synthetic_task_dir, synthetic_eval_dir):
    dm = _dm(
        synthetic_task_dir, synthetic_eval_dir, episodes_per_epoch=240, num_train_augmentations=5,
        train_on_eval_demos=True,
    )
    dm.setup()
    n_train, n_eval = len(dm.train_tasks), len(dm.eval_tasks)
    assert dm.data_summary["train_on_eval_demos"] is True
    assert dm.num_puzzle_ids == 1 + (n_train + n_eval) * 5
    keys = dm.train_dataloader().sampler.global_keys()
    eval_keys_ = [k for k in keys if k.task_index >= n_train]
    assert eval_keys_ and all(k.leave_one_out for k in eval_keys_)  # only their demo pairs are read
    # held-out episodes get the ids training gave the same puzzle versions
    val = next(iter(dm.val_dataloader()[0]))
    assert torch.equal(val["puzzle_id"], 1 + (n_train + val["task_index"]) * 5 + val["aug_index"])
