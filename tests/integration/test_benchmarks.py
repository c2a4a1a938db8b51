"""The speed benchmarks run (tiny sizes) and print their comparable lines: median, min and max of interleaved
repeats, and the ratio of the two sides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT

TINY = ["--preset", "demo", "--batch", "4", "--steps", "1", "--warmup", "1", "--repeats", "2", "--json", "",
        "--", "--model.hidden_size=32", "--model.num_heads=2", "--model.conditioner.num_layers=1"]


def _bench(script: str, *args: str) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("bench ")]


@pytest.mark.parametrize("script, ratio", [("bench_train.py", "encoder_overhead"), ("bench_eval.py", "encoder_overhead")])
def test_comparison_lines(script, ratio):
    lines = _bench(script, *TINY)
    assert len(lines) == 3
    for line in lines[:2]:
        assert "_min=" in line and "_max=" in line and "repeats=2" in line
    fields = dict(part.split("=", 1) for part in lines[2].split()[2:])
    assert float(fields[f"{ratio}_min"]) <= float(fields[ratio]) * 1.0001 and f"{ratio}_max" in fields


def test_optimizer_comparison_and_data_loading():
    lines = _bench("bench_train.py", "--optimizers", *TINY)
    assert lines[0].startswith("bench train_step optimizer=adamw") and "adam_atan2_over_adamw=" in lines[2]
    lines = _bench("bench_train.py", "--contrastive-views", *TINY)
    assert lines[0].startswith("bench train_step contrastive=shared") and "shared_over_separate=" in lines[2]
    data = _bench("bench_data.py", "--preset", "demo", "--batch", "4", "--steps", "2", "--warmup", "1", "--json", "")
    assert data[0].startswith("bench data workers=0")
