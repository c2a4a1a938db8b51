"""Exact resume: a run SIGKILLed after step 15 and resumed from last.ckpt repeats steps 16-35 bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.helpers import ROOT, tiny_args

pytestmark = pytest.mark.slow

STEPS = ["--trainer.max_steps=35", "--trainer.val_check_interval=10", "--trainer.deterministic=true",
         "--data.episodes_per_epoch=16",  # 4 batches an epoch: the kill (after step 15) lands mid-epoch
         "--last_checkpoint.every_n_train_steps=5", "--trainer.logger.init_args.name=run",
         "--trainer.callbacks+=callbacks.EMA", "--trainer.callbacks.decay=0.9"]


def _fit(out_dir, train_dir, eval_dir, losses, *extra: str) -> subprocess.CompletedProcess:
    args = tiny_args(train_dir, eval_dir, out_dir, *STEPS,
                     "--trainer.callbacks+=tests.integration.helpers.LossRecorder",
                     f"--trainer.callbacks.path={losses}", *extra)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "trm_lightning", "fit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(path) -> dict[int, tuple[float, float]]:
    """step -> (loss, a random draw made after the step: equal only if the generators were restored)."""
    return {r["step"]: (r["loss"], r["rand"]) for r in map(json.loads, open(path))}


def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    full = _fit(tmp_path / "full", synthetic_task_dir, synthetic_eval_dir, tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _fit(tmp_path / "killed", synthetic_task_dir, synthetic_eval_dir, tmp_path / "killed.jsonl",
                  "--trainer.callbacks+=tests.integration.helpers.KillAtStep", "--trainer.callbacks.step=15")
    assert killed.returncode == -9  # SIGKILL: no handler ran
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 15
    size = last.stat().st_size

    resumed = _fit(tmp_path / "killed", synthetic_task_dir, synthetic_eval_dir, tmp_path / "resumed.jsonl",
                   f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning saw a resumable loader
    assert last.stat().st_size == size  # the crashed run's checkpoint was not touched
    assert (tmp_path / "killed" / "run" / "version_1").is_dir()  # the resumed run logs to a new version

    reference, before, after = (_losses(tmp_path / f"{n}.jsonl") for n in ("full", "killed", "resumed"))
    assert sorted(before) == list(range(1, 16)) and sorted(after) == list(range(16, 36))
    assert [before[s] for s in range(1, 16)] == [reference[s] for s in range(1, 16)]
    assert [after[s] for s in range(16, 36)] == [reference[s] for s in range(16, 36)]  # bitwise equal


def test_resume_with_fresh_tasks_repeats_the_uninterrupted_run(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    """data.fresh_tasks: the tasks of every epoch are generated from (seed, task index), so a run killed mid-epoch
    and resumed trains on exactly the tasks, in the same order, of an uninterrupted run."""
    fresh = ["--data.fresh_tasks.families=[gravity,tile]", "--data.max_demos=3"]
    full = _fit(tmp_path / "full", synthetic_task_dir, synthetic_eval_dir, tmp_path / "full.jsonl", *fresh)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _fit(tmp_path / "killed", synthetic_task_dir, synthetic_eval_dir, tmp_path / "killed.jsonl", *fresh,
                  "--trainer.callbacks+=tests.integration.helpers.KillAtStep", "--trainer.callbacks.step=15")
    assert killed.returncode == -9
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _fit(tmp_path / "killed", synthetic_task_dir, synthetic_eval_dir, tmp_path / "resumed.jsonl", *fresh,
                   f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after = _losses(tmp_path / "full.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert [after[s] for s in range(16, 36)] == [reference[s] for s in range(16, 36)]  # bitwise equal
