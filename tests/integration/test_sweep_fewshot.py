"""``make sweep-fewshot`` at toy size: one fit per row plus the puzzle-id baseline, each scored into its run
directory (``fewshot_eval.json``), the ``trm report`` table built from those files (counts and Wilson intervals that
match them), the plots, a resumed sweep that keeps scored rows, and the rows' overlays all valid configs."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import yaml

from tests.integration.helpers import ROOT
from trm_lightning.stats import format_count, wilson_interval

TINY = ["--", "--model.hidden_size=32", "--model.num_heads=2", "--model.conditioner.init_args.num_layers=1",
        "--data.global_batch_size=8", "--data.episodes_per_epoch=24"]
TOY = ["--steps", "3", "--train-tasks", "40", "--heldout-tasks", "12", "--new-tasks", "10",
       "--families", "recolour", "gravity", "tile"]


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_fewshot", ROOT / "benchmarks" / "sweep_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_scores_every_row_and_reports_them(tmp_path, capsys, one_thread):
    sweep = _sweep()
    rows = ["E0_baseline", "E6_output_tokens", "T_fresh_tasks"]
    assert sweep.main(["--rows", *rows, "--out", str(tmp_path), *TOY, *TINY]) == 0
    printed = capsys.readouterr().out
    runs = tmp_path / "runs"
    records = {}
    for name in [*rows, "puzzle_emb_baseline"]:
        run = runs / name / "version_0"
        record = json.loads((run / "fewshot_eval.json").read_text())
        assert record["steps"] == 3 and record["seed"] == 0 and record["heldout_rules"] > 0
        records[name] = record["scores"]
        assert re.search(rf"^sweep: {name}: ", printed, re.M)
    assert set(records["E0_baseline"]) == {"heldout", "shuffled_context", "train"}
    assert set(records["puzzle_emb_baseline"]) == {"puzzle_emb_baseline", "baseline_new"}
    assert all(s["n"] == 12 for s in (records["E0_baseline"]["heldout"], records["E0_baseline"]["shuffled_context"]))
    assert records["E0_baseline"]["train"]["n"] == 10
    assert "puzzle_emb_len: 16" in (runs / "E6_output_tokens" / "version_0" / "config.yaml").read_text()
    # the report: one few-shot line per run, its numbers those of the run's file
    report = (tmp_path / "report" / "report.md").read_text()
    table = report.split("## Few-shot benchmark: held-out rules", 1)[1]
    for name, scores in records.items():
        held = scores.get("heldout", scores.get("puzzle_emb_baseline"))
        line = next(l for l in table.splitlines() if l.startswith(f"| {name}/version_0 |"))
        assert format_count(held["solved"], held["n"]) in line
    assert "model.puzzle_emb_len: 8 → 16" in report  # the Change column, against E0
    assert "E6 H4 (output capacity too small)" in report  # the hypothesis, from the overlay's comment
    assert (tmp_path / "report" / "fewshot.png").stat().st_size > 1000
    csv = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert "fewshot_heldout_solved" in csv[0] and len(csv) == 5
    fresh = yaml.safe_load((runs / "T_fresh_tasks" / "version_0" / "config.yaml").read_text())["data"]["fresh_tasks"]
    assert fresh["families"] == ["recolour", "gravity", "tile"] and fresh["split_seed"] == 0  # the benchmark's split
    # a second sweep keeps the scored rows
    before = (runs / "E0_baseline" / "version_0" / "fewshot_eval.json").stat().st_mtime_ns
    assert sweep.main(["--rows", *rows, "--no-puzzle-emb", "--out", str(tmp_path), *TOY, *TINY]) == 0
    again = capsys.readouterr().out
    assert again.count("already scored") == 3 and ": training" not in again
    assert (runs / "E0_baseline" / "version_0" / "fewshot_eval.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("row", sorted(p.stem for p in (ROOT / "configs" / "fewshot" / "sweep").glob("*.yaml")))
def test_every_row_overlay_is_a_valid_config_with_a_hypothesis(row, tmp_path, synthetic_task_dir,
                                                               synthetic_eval_dir):
    from tests.integration.helpers import build_tiny

    overlay = ROOT / "configs" / "fewshot" / "sweep" / f"{row}.yaml"
    first = overlay.read_text().splitlines()[0]
    assert first.startswith(f"# {row.split('_')[0]}") and len(first) > 20
    if row == "T_fresh_tasks":  # generated tasks need the few-shot split: the sweep test above trains this row
        return
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path / "runs", "--config", str(overlay))
    assert cli.model is not None


def test_wilson_interval_and_count_text():
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    lo, hi = wilson_interval(12, 182)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (3.8, 11.2)
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(3, 0) == (0.0, 1.0)
    assert format_count(12, 182) == "12/182 (6.6%) [3.8%, 11.2%]"
