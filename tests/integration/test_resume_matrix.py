"""Exact resume after every way a run can be stopped: SIGKILL, SIGTERM and Ctrl-C (SIGINT), with 0 and 2 data
workers, the ARC configs' callbacks on (EMA, diagnostics with the probe, gradient norms, collapse alerts, clipping).

Each case stops a tiny run mid-epoch, resumes it from ``last.ckpt`` and compares, step by step from the first step
after the resume to step 40 (at least 20 steps), the loss, a random draw and every logged metric with the same run
uninterrupted: bit for bit. SIGTERM and SIGINT stop at the end of the step they arrive in (exit 143 / 130, status
``interrupted`` with the signal); SIGKILL leaves the last periodic ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.helpers import ROOT, tiny_args

pytestmark = pytest.mark.slow

MAX_STEPS, SIGNAL_AT = 40, 17  # the signal arrives as step 18 starts; 4 batches an epoch: mid-epoch either way
RUN = ["--trainer.max_steps=40", "--trainer.val_check_interval=10", "--trainer.deterministic=true",
       "--trainer.gradient_clip_val=1.0", "--data.episodes_per_epoch=16", "--last_checkpoint.every_n_train_steps=5",
       "--trainer.logger.init_args.name=run",
       "--trainer.callbacks+=callbacks.EMA", "--trainer.callbacks.decay=0.9",
       "--trainer.callbacks+=callbacks.EncoderDiagnostics", "--trainer.callbacks.every_n_steps=1",
       "--trainer.callbacks.probe_every_n_steps=1", "--trainer.callbacks.probe_tasks=6",
       "--trainer.callbacks+=callbacks.GradNorms", "--trainer.callbacks.every_n_steps=1",
       "--trainer.callbacks+=callbacks.CollapseAlert", "--trainer.callbacks.check_every_n_steps=1"]
# where the interrupted run's last.ckpt is, and how the process ends
EXPECTED = {"SIGKILL": (15, -9), "SIGTERM": (SIGNAL_AT + 1, 143), "SIGINT": (SIGNAL_AT + 1, 130)}


def _fit(out_dir, dirs, record, *extra: str) -> subprocess.CompletedProcess:
    args = tiny_args(*dirs, out_dir, *RUN, *extra, "--trainer.callbacks+=tests.integration.helpers.MetricRecorder",
                     f"--trainer.callbacks.path={record}")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "trm_lightning", "fit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)


def _records(path) -> dict:
    out = {}
    for record in map(json.loads, open(path)):
        key = ("step", record["step"]) if "step" in record else ("validation", record["validation_at"])
        out[key] = record
    return out


@pytest.fixture(scope="module")
def dirs(synthetic_task_dir, synthetic_eval_dir):
    return synthetic_task_dir, synthetic_eval_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dirs):
    """The uninterrupted run's records, per number of workers."""
    out = {}
    for workers in (0, 2):
        root = tmp_path_factory.mktemp(f"reference{workers}")
        done = _fit(root, dirs, root / "r.jsonl", f"--data.num_workers={workers}")
        assert done.returncode == 0, done.stderr[-3000:]
        out[workers] = _records(root / "r.jsonl")
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_resume_after_a_signal_repeats_the_uninterrupted_run(signal_name, workers, tmp_path, dirs, reference):
    ckpt_step, code = EXPECTED[signal_name]
    stopped = _fit(tmp_path, dirs, tmp_path / "a.jsonl", f"--data.num_workers={workers}",
                   "--trainer.callbacks+=tests.integration.helpers.SignalAtStep", f"--trainer.callbacks.step={SIGNAL_AT}",
                   f"--trainer.callbacks.signal_name={signal_name}")
    assert stopped.returncode == code, stopped.stderr[-3000:]
    run_dir = tmp_path / "run" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == ckpt_step
    if signal_name != "SIGKILL":
        status = json.loads((run_dir / "status.json").read_text())["fit"]
        assert (status["status"], status["signal"], status["global_step"]) == ("interrupted", signal_name, ckpt_step)
        assert f"trm: stopped by {signal_name}" in stopped.stderr and "Traceback" not in stopped.stderr

    resumed = _fit(tmp_path, dirs, tmp_path / "b.jsonl", f"--data.num_workers={workers}", f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = reference[workers], _records(tmp_path / "b.jsonl")
    steps = sorted(s for kind, s in got if kind == "step")
    assert steps == list(range(ckpt_step + 1, MAX_STEPS + 1)) and len(steps) >= 20
    for key in sorted(got):
        assert got[key] == want[key], key  # loss, random draw, every metric: bitwise (JSON floats round-trip)
    assert [k for k in got if k[0] == "validation"] == [("validation", s) for s in (20, 30, 40) if s > ckpt_step]
