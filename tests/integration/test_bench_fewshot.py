"""The held-out-rule benchmark driver end to end, at toy size: task directories, two fits through ``trm fit``
(concurrent subprocesses), checkpoints, the four counts and the verdict line (a toy run fails the targets); the
verdict against the targets on made-up scores; the fresh-task variant's fit trains on generated tasks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys

import numpy as np
import torch

from tests.integration.helpers import ROOT

LINE = re.compile(r"^fewshot: (PASS|FAIL) heldout=(\d+)/(\d+) \(\d+\.\d%\) shuffled_context=(\d+)/(\d+) "
                  r"puzzle_emb_baseline=(\d+)/(\d+) train=(\d+)/(\d+)( \(.*\))?$")
TINY = ["--", "--model.hidden_size=32", "--model.num_heads=2", "--model.conditioner.num_layers=1",
        "--model.halt_max_steps=2", "--data.global_batch_size=8", "--data.episodes_per_epoch=24"]


def _driver():
    spec = importlib.util.spec_from_file_location("bench_fewshot", ROOT / "benchmarks" / "bench_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_fewshot_end_to_end_tiny(tmp_path, capsys, one_thread):
    passed, line = _driver().main([
        "--steps", "3", "--train-tasks", "40", "--heldout-tasks", "12", "--new-tasks", "10", "--out", str(tmp_path),
        "--families", "recolour", "gravity", "tile", "--record", str(tmp_path / "record.jsonl"), *TINY,
    ])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == line
    match = LINE.match(line)
    assert match, line
    verdict, heldout, n, shuffled, n2, baseline, n3, train, m = match.groups()[:9]
    assert not passed and verdict == "FAIL" and "train" in match.group(10)  # 3 steps learn nothing
    assert int(n) == int(n2) == int(n3) == 12 and int(m) == 10  # one query per task
    # the per-family table adds up to the same totals
    total = next(row for row in printed if row.strip().startswith("all ") and "/" in row)
    assert f"{train}/10" in total and f"{heldout}/12" in total and f"{baseline}/12" in total
    for name in ("encoder", "puzzle_emb"):
        run = tmp_path / name / "bench"
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert len(list((tmp_path / "data" / "heldout").glob("*.json"))) == 12
    assert len(list((tmp_path / "data" / "train").glob("*.json"))) == 40
    assert '"passed": false' in (tmp_path / "record.jsonl").read_text()
    # what the held-out answers are: one row per family, each adding up to the family's queries, and in the record
    answers = json.loads((tmp_path / "record.jsonl").read_text())["answers"]
    assert sum(answers["heldout"]["all"].values()) == 12 and sum(answers["train"]["all"].values()) == 10
    assert answers["heldout"]["all"]["solved"] == int(heldout)
    assert any(row.startswith("fewshot: held-out answers") for row in printed)
    # the context probes: s and c of every family with two training values, scored on both query sets
    probe = json.loads((tmp_path / "record.jsonl").read_text())["probe"]
    assert set(probe) == {"recolour", "gravity", "tile"}
    for entry in probe.values():
        assert set(entry) == {"s_new", "s_heldout", "c_new", "c_heldout"} and all(0 <= a <= n for a, n in entry.values())
    assert sum(probe[f]["c_heldout"][1] for f in probe) == 12
    assert any(row.startswith("fewshot: linear probes") for row in printed)
    # --rescore trains nothing and scores the same checkpoints the same
    checkpoint = tmp_path / "encoder" / "bench" / "checkpoints" / "last.ckpt"
    before = checkpoint.stat().st_mtime_ns
    again, line_again = _driver().main(["--rescore", "--train-tasks", "40", "--heldout-tasks", "12", "--new-tasks", "10",
                                        "--out", str(tmp_path), "--families", "recolour", "gravity", "tile", *TINY])
    assert (again, line_again) == (passed, line) and checkpoint.stat().st_mtime_ns == before


def test_verdict_applies_every_target():
    bench = _driver()
    args = argparse.Namespace(min_train=0.9, min_heldout=0.5, max_shuffled=0.05, max_baseline=0.05)

    def sc(k: int, n: int):
        return bench.Score(torch.arange(n) < k, torch.ones(n))

    good = {"train": sc(95, 100), "heldout": sc(60, 100), "shuffled_context": sc(5, 100),
            "puzzle_emb_baseline": sc(0, 100)}
    passed, line = bench.verdict(good, args)
    assert passed and line == ("fewshot: PASS heldout=60/100 (60.0%) shuffled_context=5/100 puzzle_emb_baseline=0/100 "
                               "train=95/100")
    for name, bad in (("train", sc(89, 100)), ("heldout", sc(49, 100)), ("shuffled_context", sc(6, 100)),
                      ("puzzle_emb_baseline", sc(6, 100))):
        passed, line = bench.verdict({**good, name: bad}, args)
        assert not passed and line.startswith("fewshot: FAIL") and f"({name} " in line, line
    passed, line = bench.verdict({k: v for k, v in good.items() if k != "puzzle_emb_baseline"}, args)
    assert not passed and "puzzle_emb_baseline not measured" in line


def test_bench_fewshot_fresh_tasks_fit(tmp_path, capsys, one_thread):
    bench = _driver()
    passed, line = bench.main(["--steps", "2", "--train-tasks", "16", "--heldout-tasks", "8", "--new-tasks", "6",
                               "--models", "encoder", "--fresh-tasks", "--families", "recolour", "tile",
                               "--out", str(tmp_path), *TINY, "--data.fresh_tasks.siblings=2"])
    assert not passed and "puzzle_emb_baseline not measured" in line
    log = (tmp_path / "encoder_fit.log").read_text()
    assert "generated on the fly" in log
    config = (tmp_path / "encoder" / "bench" / "config.yaml").read_text()
    assert "fresh_tasks:" in config and "split_seed: 0" in config and "siblings: 2" in config


def test_bench_fewshot_rule_oracle_fit_gives_a_factorised_context(tmp_path, capsys, one_thread):
    """``--conditioner ...RulePartOracle`` trains the decoder on the oracle's context (the encoder knobs of the
    overrides are dropped with the class), and the probes read s and c from it perfectly, held-out rules too."""
    bench = _driver()
    bench.main(["--steps", "2", "--train-tasks", "16", "--heldout-tasks", "8", "--new-tasks", "6", "--probe-tasks", "2",
                "--models", "encoder", "--families", "outline", "gravity", "--out", str(tmp_path),
                "--conditioner", "trm_lightning.rule_oracle.RulePartOracle", *TINY])
    config = (tmp_path / "encoder" / "bench" / "config.yaml").read_text()
    assert "class_path: trm_lightning.rule_oracle.RulePartOracle" in config
    probe = json.loads((tmp_path / "encoder" / "bench" / "fewshot_eval.json").read_text())["probe"]
    for family in ("outline", "gravity"):
        for key, (right, n) in probe[family].items():
            assert right == n > 0, (family, key)


def test_bench_fewshot_curve_scores_every_kept_checkpoint(tmp_path, capsys, one_thread):
    """``--curve-every 2`` over 4 steps keeps the checkpoints of steps 2 and 4 (validation is off, so the periodic
    checkpoint must survive without a metric to monitor) and scores each; the step-4 point is the final model,
    so it equals the final scores exactly."""
    import json

    bench = _driver()
    bench.main(["--steps", "4", "--curve-every", "2", "--train-tasks", "24", "--heldout-tasks", "8", "--new-tasks", "6",
                "--models", "encoder", "--families", "recolour", "tile", "--out", str(tmp_path), *TINY])
    printed = capsys.readouterr().out.splitlines()
    curve_lines = [row for row in printed if row.startswith("fewshot curve ")]
    assert [row.split()[2] for row in curve_lines] == ["step=2", "step=4"]
    run = tmp_path / "encoder" / "bench"
    assert sorted(p.name for p in (run / "checkpoints").glob("curve_step*.ckpt")) == ["curve_step2.ckpt",
                                                                                       "curve_step4.ckpt"]
    record = json.loads((run / "fewshot_eval.json").read_text())
    assert [point["step"] for point in record["curve"]] == [2, 4]
    last = record["curve"][-1]
    for name in ("heldout", "shuffled_context", "train"):
        final = record["scores"][name]
        assert last[name] == [final["solved"], final["n"], final["cell_accuracy"]], name
    assert last["heldout"][1] == 8 and last["train"][1] == 6


def test_answer_kinds_tell_a_memorised_answer_from_a_composed_one():
    """Hand-made answers to outline(0,5) queries: its own output, outline(0,3)'s (same s), outline(2,5)'s (same c),
    frame(0,5)'s (another family: not counted as a rule), the input, and garbage."""
    from trm_lightning.data.fewshot_rules import FewshotRule
    from trm_lightning.data.tokenize import grid_to_canvas

    bench = _driver()
    grid = np.zeros((5, 5), np.uint8)
    grid[2, 2] = 4
    own, same_s, same_c = FewshotRule("outline", 0, 5), FewshotRule("outline", 0, 3), FewshotRule("outline", 2, 5)
    frame = FewshotRule("frame", 0, 5)
    garbage = np.full((5, 5), 7, np.uint8)
    outputs = [own.apply(grid), same_s.apply(grid), same_c.apply(grid), frame.apply(grid), grid, garbage]
    canvas = torch.from_numpy(np.stack([grid_to_canvas(grid, 8)] * len(outputs)).astype(np.int64))
    answers = torch.from_numpy(np.stack([grid_to_canvas(o, 8) for o in outputs]).astype(np.int64))
    exact = torch.tensor([True] + [False] * (len(outputs) - 1))
    sc = bench.Score(exact, exact.double(), answers)
    kinds = bench.answer_kinds(sc, {"inputs": canvas}, [own.name] * len(outputs), [same_s, same_c, frame])
    assert kinds == ["solved", "same s, other c", "same c, other s", "none", "input unchanged", "none"]
    # a rule that fails on the input (size() needs an object) is no match, not an error
    empty = torch.from_numpy(grid_to_canvas(np.zeros((4, 4), np.uint8), 8)[None].astype(np.int64))
    sc = bench.Score(torch.tensor([False]), torch.zeros(1), empty)
    assert bench.answer_kinds(sc, {"inputs": empty}, ["size(0,5)"], [FewshotRule("size", 1, 5)]) == ["input unchanged"]


def test_linear_probe_reads_a_coded_label_and_not_noise():
    """The context probe on made-up features: a label written into two of 40 noisy features is read back on new
    rows; a label independent of the features is read at about chance."""
    bench = _driver()
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=gen) + 3  # labels need not start at 0
    x = torch.randn(400, 40, generator=gen)
    x[:, 5] += 6.0 * (y % 2)
    x[:, 9] += 6.0 * (y // 2 % 2)
    predict = bench.linear_probe(x[:300], y[:300])
    assert float((predict(x[300:]) == y[300:]).float().mean()) > 0.9
    noise = torch.randint(0, 4, (400,), generator=gen)
    predict = bench.linear_probe(x[:300], noise[:300])
    assert float((predict(x[300:]) == noise[300:]).float().mean()) < 0.45


def test_rescore_without_a_run_is_refused(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--rescore: no last.ckpt of the encoder fit"):
        _driver().main(["--rescore", "--models", "encoder", "--train-tasks", "8", "--heldout-tasks", "4",
                        "--new-tasks", "4", "--out", str(tmp_path), "--families", "recolour", *TINY])
