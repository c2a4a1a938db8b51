"""bf16-mixed on the CPU: the tiny config trains to a finite, falling loss (the GPU path's precision, checked here)."""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.helpers import build_tiny

pytestmark = pytest.mark.slow


def test_bf16_mixed_cpu_trains_to_a_finite_falling_loss(tmp_path, synthetic_task_dir, synthetic_eval_dir, one_thread):
    losses = tmp_path / "losses.jsonl"
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.precision=bf16-mixed",
                     "--trainer.max_steps=60", "--trainer.val_check_interval=60", "--model.lr=3e-3",
                     "--model.lr_warmup_steps=5", "--data.episodes_per_epoch=48", "--model.halt_max_steps=1",
                     "--trainer.callbacks+=tests.integration.helpers.LossRecorder",
                     f"--trainer.callbacks.path={losses}")
    cli.trainer.fit(cli.model, cli.datamodule)
    assert str(cli.trainer.precision) == "bf16-mixed"
    values = [json.loads(line)["loss"] for line in open(losses)]
    assert len(values) == 60 and all(math.isfinite(v) for v in values)
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.8 * first, (first, last)
