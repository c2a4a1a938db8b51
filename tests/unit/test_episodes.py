from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from trm_lightning.data.arc import ArcTask
from trm_lightning.data.augment import Augmentation, augmentation_for
from trm_lightning.data.episodes import EpisodeDataset, EpisodeKey, EpisodeSampler, KeyedEpisodes, eval_keys
from trm_lightning.data.synthetic import make_synthetic_tasks
from trm_lightning.data.tokenize import crop_canvas
from trm_lightning.vocab import EOS, IGNORE_LABEL, PAD
from trm_lightning.errors import ConfigError, DataError

S = 8


@pytest.fixture(scope="module")
def tasks():
    return make_synthetic_tasks(5, seed=3, n_train=3, n_test=2)


def _labels_to_grid(labels: torch.Tensor) -> np.ndarray:
    tokens = labels.clone()
    tokens[tokens == IGNORE_LABEL] = PAD
    return crop_canvas(tokens)


def test_episode_tensors(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=4)
    assert len(ds) == 5
    item = ds[EpisodeKey(2, 1, 0)]
    expected = {
        "demo_inputs": (torch.int32, (4, S * S)),
        "demo_outputs": (torch.int32, (4, S * S)),
        "demo_mask": (torch.bool, (4,)),
        "inputs": (torch.int32, (S * S,)),
        "labels": (torch.int64, (S * S,)),
        "task_index": (torch.int64, ()),
        "aug_index": (torch.int64, ()),
        "query_index": (torch.int64, ()),
        "puzzle_id": (torch.int64, ()),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == expected
    assert item["demo_mask"].tolist() == [True, True, True, False]
    assert (item["demo_inputs"][3] == PAD).all() and (item["demo_outputs"][3] == PAD).all()
    assert (item["task_index"].item(), item["query_index"].item(), item["aug_index"].item()) == (2, 1, 0)
    task = tasks[2]
    for slot in range(3):
        np.testing.assert_array_equal(crop_canvas(item["demo_inputs"][slot]), task.train[slot][0])
        np.testing.assert_array_equal(crop_canvas(item["demo_outputs"][slot]), task.train[slot][1])
    np.testing.assert_array_equal(crop_canvas(item["inputs"]), task.test[1][0])
    np.testing.assert_array_equal(_labels_to_grid(item["labels"]), task.test[1][1])
    # labels: -100 exactly where the output canvas is PAD; EOS supervised
    assert (item["labels"] == EOS).any()
    assert ((item["labels"] == IGNORE_LABEL) | (item["labels"] >= 1)).all()
    # an int means EpisodeKey(i, 0, 0)
    int_item, key_item = ds[4], ds[EpisodeKey(4, 0, 0)]
    assert all(torch.equal(int_item[k], key_item[k]) for k in expected)


def test_augmented_episode_inverts(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=3, seed=11)
    item = ds[EpisodeKey(1, 0, 17)]
    aug = augmentation_for(11, tasks[1].task_id, 17)
    assert aug != Augmentation.identity()
    for slot, (inp, out) in enumerate(tasks[1].train):
        np.testing.assert_array_equal(crop_canvas(item["demo_inputs"][slot]), aug.apply(inp))
        np.testing.assert_array_equal(aug.invert(crop_canvas(item["demo_outputs"][slot])), out)
    np.testing.assert_array_equal(aug.invert(_labels_to_grid(item["labels"])), tasks[1].test[0][1])


def test_max_demos_keeps_the_first(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=2)
    item = ds[EpisodeKey(0, 0, 0)]
    assert item["demo_mask"].tolist() == [True, True]
    np.testing.assert_array_equal(crop_canvas(item["demo_inputs"][1]), tasks[0].train[1][0])


def test_leave_one_out_excludes_the_query(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=4)
    task = tasks[3]
    item = ds[EpisodeKey(3, 1, 0, leave_one_out=True)]
    assert item["demo_mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(crop_canvas(item["inputs"]), task.train[1][0])
    np.testing.assert_array_equal(_labels_to_grid(item["labels"]), task.train[1][1])
    demos = [crop_canvas(item["demo_inputs"][s]).tobytes() for s in range(2)]
    assert demos == [task.train[0][0].tobytes(), task.train[2][0].tobytes()]
    with pytest.raises(IndexError):
        ds[EpisodeKey(3, 3, 0, leave_one_out=True)]


def test_unknown_output_gives_ignored_labels():
    grid = np.array([[1, 2]], dtype=np.uint8)
    task = ArcTask("u", train=((grid, grid),), test=((grid, None),), source="mem")
    item = EpisodeDataset([task], canvas_size=4, max_demos=1)[0]
    assert (item["labels"] == IGNORE_LABEL).all()
    assert item["inputs"].tolist()[:8] == [3, 4, EOS, PAD, EOS, EOS, PAD, PAD]  # the query input is still there


def test_too_large_grid_is_a_data_error():
    grid = np.zeros((5, 5), dtype=np.uint8)
    task = ArcTask("big", train=((grid, grid),), test=((grid, grid),), source="mem")
    with pytest.raises(DataError, match="task 'big' demo 0 input: a 5x5 grid does not fit canvas 4"):
        EpisodeDataset([task], canvas_size=4, max_demos=1)[0]


def _top_left(canvas: torch.Tensor) -> tuple[int, int]:
    rows, cols = np.nonzero(canvas.reshape(S, S).numpy() >= 2)
    return int(rows.min()), int(cols.min())


def test_translation_shares_one_offset_per_episode(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=3, translate=True)
    moved = 0
    for aug_index in range(1, 25):
        item = ds[EpisodeKey(0, 0, aug_index)]
        canvases = [*item["demo_inputs"], *item["demo_outputs"], item["inputs"]]
        labels = item["labels"].clone()
        labels[labels < 0] = 0
        corners = {_top_left(c) for c in canvases + [labels]}
        assert len(corners) == 1
        moved += corners != {(0, 0)}
    assert moved > 12
    # aug 0 (the original) stays at the top-left
    item = ds[EpisodeKey(0, 0, 0)]
    assert _top_left(item["inputs"]) == (0, 0)


def test_default_collate_batches(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=3)
    keys = eval_keys(tasks, [0, 1])
    batch = next(iter(DataLoader(KeyedEpisodes(ds, keys), batch_size=4)))
    assert batch["demo_inputs"].shape == (4, 3, S * S)
    assert batch["labels"].shape == (4, S * S)
    assert batch["aug_index"].tolist() == [0, 1, 0, 1]
    assert batch["query_index"].tolist() == [0, 0, 1, 1]


def test_eval_keys():
    grid = np.zeros((1, 1), dtype=np.uint8)
    a = ArcTask("a", train=((grid, grid),), test=((grid, grid), (grid, None), (grid, grid)), source="mem")
    b = ArcTask("b", train=((grid, grid),), test=((grid, None),), source="mem")
    keys = eval_keys([a, b], range(2))
    assert keys == [EpisodeKey(0, 0, 0), EpisodeKey(0, 0, 1), EpisodeKey(0, 2, 0), EpisodeKey(0, 2, 1)]
    assert len(eval_keys([a, b], [0], include_unlabelled=True)) == 4


def _sampler(tasks, episodes, **kwargs):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=3)
    return EpisodeSampler(ds, tasks, episodes, **kwargs)


def test_sampler_is_a_distributed_sampler_and_deterministic(tasks):
    sampler = _sampler(tasks, 40, seed=5, num_augmentations=50)
    assert isinstance(sampler, DistributedSampler)
    first = list(sampler)
    assert len(first) == len(sampler) == 40
    assert list(_sampler(tasks, 40, seed=5, num_augmentations=50)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(_sampler(tasks, 40, seed=6, num_augmentations=50)) != first
    assert all(0 <= k.aug_index < 50 for k in first)
    assert all(not k.leave_one_out for k in first)
    assert {k.query_index for k in first} == {0, 1}


def test_sampler_ranks_split_the_global_list(tasks):
    full = _sampler(tasks, 100, seed=1)
    ranks = [list(_sampler(tasks, 100, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [33, 33, 33]
    assert len(_sampler(tasks, 100, num_replicas=3, rank=2)) == 33
    glob = full.global_keys()
    assert glob == list(full)
    for r in range(3):
        assert ranks[r] == glob[r::3][:33]
    # positions are disjoint: interleaving the ranks gives back the first 99 global keys
    interleaved = [ranks[i % 3][i // 3] for i in range(99)]
    assert interleaved == glob[:99]


def test_sampler_visits_tasks_evenly(tasks):
    keys = list(_sampler(tasks, 5 * 7, seed=2))
    assert Counter(k.task_index for k in keys) == {i: 7 for i in range(5)}
    keys = list(_sampler(tasks, 12, seed=2))  # two full rounds of 5, then 2 of a third round
    counts = Counter(k.task_index for k in keys)
    assert sorted(counts.values()) == [2, 2, 2, 3, 3]


def test_sampler_identity_augmentation_drawn(tasks):
    keys = list(_sampler(tasks, 200, num_augmentations=2))
    assert {k.aug_index for k in keys} == {0, 1}


def test_sampler_leave_one_out(tasks):
    keys = list(_sampler(tasks, 50, leave_one_out_prob=1.0))
    assert all(k.leave_one_out and 0 <= k.query_index < 3 for k in keys)
    keys = list(_sampler(tasks, 400, leave_one_out_prob=0.5))
    share = sum(k.leave_one_out for k in keys) / len(keys)
    assert 0.4 < share < 0.6
    # a task with one demo never gets a leave-one-out episode
    grid = np.zeros((1, 1), dtype=np.uint8)
    single = [ArcTask("one", train=((grid, grid),), test=((grid, grid),), source="mem")]
    assert not any(k.leave_one_out for k in _sampler(single, 20, leave_one_out_prob=1.0))


def test_sampler_uses_only_labelled_test_pairs():
    grid = np.zeros((1, 1), dtype=np.uint8)
    task = ArcTask("t", train=((grid, grid),), test=((grid, None), (grid, grid)), source="mem")
    assert {k.query_index for k in _sampler([task], 30)} == {1}
    bare = ArcTask("bare", train=((grid, grid),), test=((grid, None),), source="mem")
    with pytest.raises(DataError, match="'bare' has no test pair with a known output"):
        _sampler([bare], 4)


def test_sampler_validation(tasks):
    with pytest.raises(ConfigError, match="episodes_per_epoch=2 is less than the number of ranks"):
        _sampler(tasks, 2, num_replicas=4, rank=0)
    with pytest.raises(ConfigError):
        _sampler(tasks, 10, leave_one_out_prob=1.5)


def test_sampler_drives_a_dataloader(tasks):
    ds = EpisodeDataset(tasks, canvas_size=S, max_demos=3)
    loader = DataLoader(ds, batch_size=4, sampler=EpisodeSampler(ds, tasks, 10), drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    assert batches[0]["inputs"].shape == (4, S * S)
