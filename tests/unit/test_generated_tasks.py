"""The generated tasks, byte for byte: the ARC JSON files that both generators' tasks are written as (and the tasks'
sources) are pinned by sha256, so moving or refactoring a generator cannot change a single grid unnoticed.

Recorded with numpy 2.4 (numpy is not pinned in ``requirements/constraints.txt``; its ``Generator`` streams are
meant to stay stable across releases): if a numpy upgrade ever changes one, regenerate the digests and say so in the
commit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from trm_lightning.data.fewshot_rules import make_fewshot_split
from trm_lightning.data.synthetic import make_synthetic_tasks
from trm_lightning.data.task_json import write_task_dir


def _digest(tasks, directory: Path) -> str:
    write_task_dir(tasks, directory)
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for task in tasks:
        h.update(task.source.encode())
    return h.hexdigest()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(n_tasks=12, seed=0, prefix="syn"), "e7c88a4e9588ad7252d4188500d30e66c5d97a022e5179d744e3edaafc629fe3"),
        (dict(n_tasks=6, seed=1, prefix="evl"), "135e833eb187a31ec80412e9bcf871221617486fb6ebd84d2f09f738f24024ca"),
        (dict(n_tasks=20, seed=7, min_side=2, max_side=7, n_train=2, prefix="big"),
         "0652079fb80b844644222849ae4b9f43747b2446692fcc40b4cffa2d6ffd2303"),
    ],
)
def test_synthetic_fixture_tasks_are_pinned(tmp_path, kwargs, expected):
    assert _digest(make_synthetic_tasks(**kwargs), tmp_path) == expected


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        ((140, 92, 0), dict(n_demos=3, n_test=2, max_side=6),
         ("eedb3972aa60245c3ac454b0d92942c8c33d21192a5be448a9abecd01cfbe061",
          "92928afcb0ee1f99779eb46897d6c9018ee4b1cb5354e2d3e97a60254eed7233")),
        ((40, 12, 3), dict(families=["tile", "fill", "size", "lines"], heldout_fraction=0.3, max_side=8),
         ("a03470d7854b653d8a5ac8ec43d08419e40d414fb3c38c517b8ad2fc39a5c7ee",
          "cb39ed103a29504f505e66fd4210b7f4b70045f11ca44e5b6a40506c861ba146")),
    ],
)
def test_fewshot_rule_tasks_are_pinned(tmp_path, args, kwargs, expected):
    train, heldout = make_fewshot_split(*args, **kwargs)
    assert (_digest(train, tmp_path / "train"), _digest(heldout, tmp_path / "heldout")) == expected
