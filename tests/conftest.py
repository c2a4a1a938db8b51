"""Shared fixtures: small synthetic ARC task directories (generated, never downloaded)."""

from __future__ import annotations

import os

import pytest

# One intra-op thread everywhere (this process and the `trm` subprocesses tests start): the tiny models gain
# nothing from more, and on a busy 2-core machine OpenMP threads spinning against other processes slow the
# suite down many times over.
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)

from trm_lightning.data.synthetic import make_synthetic_tasks
from trm_lightning.data.task_json import write_task_dir

N_TRAIN_TASKS = 12
N_EVAL_TASKS = 6


@pytest.fixture(scope="session")
def synthetic_train_tasks():
    """12 tasks ``syn000..syn011``: 3 demos + 1 test pair each, grids 2..5 per side (fit canvas 6)."""
    return make_synthetic_tasks(N_TRAIN_TASKS, seed=0, prefix="syn")


@pytest.fixture(scope="session")
def synthetic_eval_tasks():
    """6 other tasks ``evl000..evl005`` (another seed), same sizes."""
    return make_synthetic_tasks(N_EVAL_TASKS, seed=1, prefix="evl")


@pytest.fixture(scope="session")
def synthetic_task_dir(tmp_path_factory, synthetic_train_tasks):
    """A directory of one ARC JSON file per task, holding :func:`synthetic_train_tasks`."""
    return write_task_dir(synthetic_train_tasks, tmp_path_factory.mktemp("synthetic_train"))


@pytest.fixture(scope="session")
def synthetic_eval_dir(tmp_path_factory, synthetic_eval_tasks):
    """A directory of one ARC JSON file per task, holding :func:`synthetic_eval_tasks`."""
    return write_task_dir(synthetic_eval_tasks, tmp_path_factory.mktemp("synthetic_eval"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from more, and a busy 2-core machine runs them
    much faster on one (the DDP ranks these tests start use OMP_NUM_THREADS=1 likewise)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
