"""Diagnostics and alerts under 2-process CPU DDP (gloo), through the real ``trm`` command (slow).

- The diagnostics a 2-rank run writes equal those of a 1-process run on the same global batch (1e-5):
  the batch statistics are gathered over ranks, the gradient norms are taken after DDP's all-reduce.
- A NaN loss on rank 1 only stops (or aborts) *both* ranks at the same step, without a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.integration.helpers import ROOT, run_tiny, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TRM = str(Path(sys.executable).parent / "trm")
TIMEOUT = 420  # a hang (one rank waiting in a collective for the other) ends here instead of forever


class PoisonLoss(Callback):
    """Test helper the ``trm`` subprocesses import: after optimizer step ``step``, rank ``rank`` reports a NaN
    loss (after backward, so only that rank's ``outputs["loss"]`` is bad); every rank records how it ended.

    Args:
        rank: the global rank that sees the NaN.
        step: the optimizer step after which it sees it.
        record_dir: where ``rank<r>.json`` is written.
    """

    def __init__(self, rank: int = 1, step: int = 2, record_dir: str = ".") -> None:
        self.rank = rank
        self.step = step
        self.record_dir = record_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            outputs["loss"] = torch.tensor(float("nan"))

    def _record(self, trainer, **extra):
        with open(os.path.join(self.record_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"global_step": trainer.global_step, "world_size": trainer.world_size, **extra}, f)

    def on_train_end(self, trainer, pl_module):
        self._record(trainer, should_stop=bool(trainer.should_stop))

    def on_exception(self, trainer, pl_module, exception):
        self._record(trainer, exception=type(exception).__name__)


def _callbacks_yaml(path: Path, *extra: dict) -> str:
    callbacks = [
        *extra,
        {"class_path": "callbacks.EncoderDiagnostics",
         "init_args": {"every_n_steps": 1, "probe_every_n_steps": 2, "probe_tasks": 6}},
        {"class_path": "callbacks.GradNorms", "init_args": {"every_n_steps": 1}},
        {"class_path": "callbacks.ContextReliance"},
    ]
    path.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))  # JSON is YAML
    return str(path)


COMMON = ("--trainer.max_steps=4", "--model.halt_exploration_prob=0.0")  # no per-rank random halting
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")


def _trm_fit(train_dir, eval_dir, out, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [TRM, "fit", *tiny_args(train_dir, eval_dir, out, *args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)




def _scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def test_ddp_diagnostics_equal_one_process(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    config = _callbacks_yaml(tmp_path / "callbacks.yaml")
    single = run_tiny("fit", synthetic_task_dir, synthetic_eval_dir, tmp_path / "one", "--config", config, *COMMON)
    one = _scalars(single.trainer.log_dir)

    out = _trm_fit(synthetic_task_dir, synthetic_eval_dir, tmp_path / "ddp", "--config", config, *COMMON, *DDP)
    assert out.returncode == 0, out.stderr[-3000:]
    (log_dir,) = (tmp_path / "ddp" / "trm").iterdir()
    two = _scalars(log_dir)

    compared = [t for t in one if t.startswith(("diagnostics/", "grad/", "update_ratio/"))]
    compared += ["val/accuracy_zero_context", "val/exact_accuracy_zero_context", "val/reliance_drop_zero_cell"]
    assert len(compared) > 20
    for tag in compared:
        assert set(two[tag]) == set(one[tag]), tag
        for step, value in one[tag].items():
            assert two[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-5), (tag, step)
    assert set(one["diagnostics/probe_drift_cosine"]) == {3}


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_one_ranks_nan_stops_both_ranks(synthetic_task_dir, synthetic_eval_dir, tmp_path, action):
    poison = {"class_path": "tests.integration.test_callbacks_ddp.PoisonLoss",
              "init_args": {"rank": 1, "step": 2, "record_dir": str(tmp_path)}}
    rules = [{"class_path": "NonFinite", "init_args": {"action": action}}, {"class_path": "RepresentationCollapse"}]
    alert = {"class_path": "callbacks.CollapseAlert", "init_args": {"check_every_n_steps": 1, "rules": rules}}
    # the alert after the poison (it must see the NaN) but before EncoderDiagnostics: it makes the diagnostics'
    # collectives run inside its own hook, on both ranks at the same steps
    config = _callbacks_yaml(tmp_path / "callbacks.yaml", poison, alert)

    out = _trm_fit(synthetic_task_dir, synthetic_eval_dir, tmp_path / "run", "--config", config, *COMMON, *DDP,
                   "--trainer.max_steps=8", "--trainer.limit_val_batches=0")
    records = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert all(rec["world_size"] == 2 and rec["global_step"] == 2 for rec in records.values()), records
    (log_dir,) = (tmp_path / "run" / "trm").iterdir()
    with open(log_dir / "alerts.jsonl") as f:
        alerts = [json.loads(line) for line in f]
    assert [(a["rule"], a["step"]) for a in alerts] == [("nonfinite", 2)]
    assert alerts[0]["values"] == {"nonfinite_loss_ranks": 1.0, "nonfinite_grad_ranks": 0.0, "first_nonfinite_step": 2.0}
    assert (log_dir / "checkpoints" / "alert-step2.ckpt").exists()
    if action == "stop":
        assert out.returncode == 0, out.stderr[-3000:]
        assert all(rec["should_stop"] for rec in records.values())
    else:
        assert out.returncode == 2, out.stderr[-3000:]
        assert all(rec["exception"] == "CollapseAlertError" for rec in records.values())
        assert "trm: error: CollapseAlert [nonfinite] at step 2" in out.stderr
