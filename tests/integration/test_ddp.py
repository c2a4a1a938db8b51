"""Two CPU processes (gloo DDP) train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT, tiny_args

pytestmark = pytest.mark.slow


def _scalars(log_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(log_dir)
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def _run(out_dir, train_dir, eval_dir, *extra: str) -> str:
    args = tiny_args(
        train_dir, eval_dir, out_dir, "--trainer.max_steps=10", "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=10", "--model.halt_exploration_prob=0.0", "--data.episodes_per_epoch=40",
        "--trainer.logger.init_args.name=run", "--trainer.callbacks+=callbacks.RunSummary", *extra,
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "trm_lightning", "fit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary reads trainer.log_dir (a collective under DDP) on every rank and prints once
    assert [line for line in proc.stdout.splitlines() if line.startswith("fit: 10 steps")], proc.stdout[-2000:]
    return os.path.join(out_dir, "run", "version_0")


def test_two_process_ddp_matches_one_process(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    one = _run(tmp_path / "one", synthetic_task_dir, synthetic_eval_dir)
    two = _run(tmp_path / "two", synthetic_task_dir, synthetic_eval_dir, "--config", str(ROOT / "configs/trainer/ddp_sim.yaml"))
    for tag in ["train/lm_loss", "train/q_halt_loss", "train/accuracy"]:
        a, b = _scalars(one, tag), _scalars(two, tag)
        assert len(a) == len(b) == 10, (tag, len(a), len(b))
        assert a == pytest.approx(b, abs=1e-5), tag
    assert _scalars(one, "val/exact_accuracy") == pytest.approx(_scalars(two, "val/exact_accuracy"), abs=1e-6)
    assert _scalars(one, "val/count") == _scalars(two, "val/count")


def _test(out_dir, train_dir, eval_dir, ckpt, *extra: str) -> list[str]:
    args = tiny_args(train_dir, eval_dir, out_dir, f"--ckpt_path={ckpt}", "--data.test_augmentations=3",
                     "--trainer.logger.init_args.name=test", *extra)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "trm_lightning", "test", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("ARC/pass@")]


def test_two_process_trm_test_gives_the_same_counts(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    run = _run(tmp_path / "fit", synthetic_task_dir, synthetic_eval_dir)
    ckpt = os.path.join(run, "checkpoints", "last.ckpt")
    one = _test(tmp_path / "one", synthetic_task_dir, synthetic_eval_dir, ckpt)
    two = _test(tmp_path / "two", synthetic_task_dir, synthetic_eval_dir, ckpt,
                "--config", str(ROOT / "configs/trainer/ddp_sim.yaml"))
    assert len(one) == 4 and one == two
    assert all("/6 tasks" in line for line in one)  # the denominator is the 6 tasks evaluated
