"""The test-time adaptation benchmark end to end, at toy size: a tiny bench_fewshot.py run, then bench_tta.py on
its encoder-TRM (both methods) and the TRM-protocol baseline it trains: one comparable line per method, paired
counts on the same queries, an interval that contains the gain, and the JSON record."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

from tests.integration.helpers import ROOT

TINY = ["--model.hidden_size=32", "--model.num_heads=2", "--model.halt_max_steps=2", "--data.global_batch_size=8",
        "--data.episodes_per_epoch=24"]
LINE = re.compile(r"^bench tta method=(\S+) steps=(\d+) tasks=(\d+) s_per_task=([\d.]+) heldout_before=(\d+)/(\d+) "
                  r"heldout_after=(\d+)/(\d+) before_ci=\S+ after_ci=\S+ gain=([+-]\d+) gain_ci=\[([+-]\d+),([+-]\d+)\] "
                  r"gain_outside_ci=(yes|no) steps_taken=([\d.]+)( task_batch=\d+)?$")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_tta_end_to_end_tiny(tmp_path, one_thread):
    _load("bench_fewshot").main([
        "--models", "encoder", "--steps", "3", "--train-tasks", "30", "--heldout-tasks", "6", "--new-tasks", "4",
        "--out", str(tmp_path), "--families", "recolour", "tile", "--", *TINY, "--model.conditioner.num_layers=1",
    ])
    record = tmp_path / "tta.jsonl"
    lines = _load("bench_tta").main([
        "--run", str(tmp_path), "--tasks", "4", "--context-steps", "2", "--finetune-steps", "2", "--threads", "1",
        "--bootstrap", "200", "--train-trm-protocol", "--trm-protocol-steps", "2", "--record", str(record),
        "--", *TINY,
    ])
    assert len(lines) == 3
    for line, method in zip(lines[:2], ("context", "finetune(all)")):
        match = LINE.match(line)
        assert match, line
        got_method, steps, tasks, _, before, n, after, n2, gain, lo, hi, outside, taken = match.groups()[:13]
        assert (got_method, steps, tasks, n, n2) == (method, "2", "4", "4", "4")
        assert int(gain) == int(after) - int(before) and int(lo) <= int(gain) <= int(hi)
        assert (outside == "yes") == (int(lo) > 0) and float(taken) == 2.0
    assert lines[2].startswith("bench tta method=trm_protocol_puzzle_emb tasks=4 heldout=")
    records = [json.loads(row) for row in record.read_text().splitlines()]
    assert [r["method"] for r in records] == ["context", "finetune(all)", "trm_protocol_puzzle_emb"]
    assert (tmp_path / "puzzle_emb_trm_protocol" / "bench" / "checkpoints" / "last.ckpt").is_file()
