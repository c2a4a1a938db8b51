"""The generated tasks, byte for byte: the ARC JSON files that both generators' tasks are written as (and the tasks'
sources) are pinned by sha256, so moving or refactoring a generator cannot change a single grid unnoticed.

The few-shot digests were regenerated once on purpose (branch fewshot): tasks that a rule of the other split also
explains (e.g. a ``paint(1, c)`` task without enclosed background, which ``fill(1, c)`` explains too) are now drawn
again, so no training task shows a held-out rule; every task drawn before the first such task is unchanged.

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
         ("125f7099f9ea1208f1de0086cdd2dfaa949e1be38194e5ae82c19bfc0e1f2ab8",
          "ec19c3d1165647cee307cb5d23ef5a6b7c07ab1f8a36be21b4f0c9f10089912c")),
        ((40, 12, 3), dict(families=["tile", "fill", "size", "lines"], heldout_fraction=0.3, max_side=8),
         ("8d9feb9574b6f431091da4aed364726c475b6b3837fd74d68eb155768b09b36f",
          "cb39ed103a29504f505e66fd4210b7f4b70045f11ca44e5b6a40506c861ba146")),
    ],
)
def test_fewshot_rule_tasks_are_pinned(tmp_path, args, kwargs, expected):
    train, heldout = make_fewshot_split(*args, **kwargs)
    assert (_digest(train, tmp_path / "train"), _digest(heldout, tmp_path / "heldout")) == expected
