"""The held-out-rule benchmark driver end to end, at toy size: task directories, two fits through ``trm fit``
(concurrent subprocesses), checkpoints, the three held-out counts and the closing line."""

from __future__ import annotations

import importlib.util
import re

from tests.integration.helpers import ROOT

LINE = re.compile(r"^fewshot: heldout=(\d+)/(\d+) shuffled_context=(\d+)/(\d+) puzzle_emb_baseline=(\d+)/(\d+)$")


def _driver():
    spec = importlib.util.spec_from_file_location("bench_fewshot", ROOT / "benchmarks" / "bench_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_fewshot_end_to_end_tiny(tmp_path, capsys, one_thread):
    line = _driver().main([
        "--steps", "3", "--train-tasks", "40", "--heldout-tasks", "12", "--train-eval-queries", "8",
        "--out", str(tmp_path),
        "--", "--model.hidden_size=32", "--model.num_heads=2", "--model.conditioner.num_layers=1",
        "--model.halt_max_steps=2", "--data.global_batch_size=8", "--data.episodes_per_epoch=24",
    ])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == line
    match = LINE.match(line)
    assert match, line
    heldout, n, shuffled, n2, baseline, n3 = (int(v) for v in match.groups())
    assert n == n2 == n3 == 12  # one query per held-out task
    assert all(0 <= k <= n for k in (heldout, shuffled, baseline))
    # the per-family table adds up to the same totals
    total = next(row for row in printed if row.strip().startswith("all "))
    assert f"{heldout}/12" in total and f"{shuffled}/12" in total and f"{baseline}/12" in total
    for name in ("encoder", "puzzle_emb"):
        run = tmp_path / name / "bench"
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert len(list((tmp_path / "data" / "heldout").glob("*.json"))) == 12
    assert len(list((tmp_path / "data" / "train").glob("*.json"))) == 40
