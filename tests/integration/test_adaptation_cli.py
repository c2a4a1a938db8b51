"""Test-time adaptation through the real CLI: it never reads a test output, ``trm predict`` and ``trm test`` agree,
the results print side by side with their protocol, and two processes count what one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT, tiny_args
from trm_lightning.cli import main

ADAPT = ["--model.adaptation.methods=[context, finetune]", "--model.adaptation.context_steps=3",
         "--model.adaptation.finetune_steps=2", "--data.test_augmentations=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_task_dir, synthetic_eval_dir):
    out = tmp_path_factory.mktemp("adapt")
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, out / "fit", "--trainer.max_steps=4")])
    return out, next((out / "fit").rglob("last.ckpt"))


def _rewrite(src, dst, change):
    dst.mkdir()
    for path in sorted(src.glob("*.json")):
        task = json.loads(path.read_text())
        task["test"] = [change(pair) for pair in task["test"]]
        (dst / path.name).write_text(json.dumps(task))
    return dst


def _run(sub, train_dir, eval_dir, out, ckpt, *extra):
    main([sub, *tiny_args(train_dir, eval_dir, out, f"--ckpt_path={ckpt}", *ADAPT, *extra)])
    run = next(out.rglob("submission.json")).parent
    return json.loads((run / "submission.json").read_text()), json.loads((run / "eval_details.json").read_text())


def test_adaptation_never_reads_a_test_output(trained, tmp_path, synthetic_task_dir, synthetic_eval_dir, capsys):
    out, ckpt = trained
    submission, details = _run("test", synthetic_task_dir, synthetic_eval_dir, tmp_path / "a", ckpt)
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("ARC/pass@2 = ") and "->" in x)
    assert "(no adaptation) -> " in line and "(context, 3 steps) -> " in line and "(finetune (all), 2 steps)" in line
    assert details["protocol"] == "held-out + test-time adaptation (finetune (all), 2 steps)"
    assert [details["results"][m]["protocol"] for m in ("no adaptation", "context")] == [
        "held-out", "held-out + test-time adaptation (context, 3 steps)"]
    assert details["results"]["context"]["tasks_adapted"] == 6 and details["results"]["context"]["seconds_per_task"] > 0
    # every test output changed: the predictions do not change
    flipped = _rewrite(synthetic_eval_dir, tmp_path / "flipped",
                       lambda p: {"input": p["input"], "output": [[(c + 1) % 10 for c in row] for row in p["output"]]})
    changed, _ = _run("test", synthetic_task_dir, flipped, tmp_path / "b", ckpt)
    assert changed == submission
    # every test output removed: predict works and predicts the same
    hidden = _rewrite(synthetic_eval_dir, tmp_path / "hidden", lambda p: {"input": p["input"]})
    predicted, _ = _run("predict", synthetic_task_dir, hidden, tmp_path / "c", ckpt)
    assert predicted == submission


@pytest.mark.slow
def test_two_processes_count_what_one_does(trained, tmp_path, synthetic_task_dir, synthetic_eval_dir):
    out, ckpt = trained
    one_submission, one = _run("test", synthetic_task_dir, synthetic_eval_dir, tmp_path / "one", ckpt)
    args = tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path / "two", f"--ckpt_path={ckpt}", *ADAPT,
                     "--config", str(ROOT / "configs" / "trainer" / "ddp_sim.yaml"), "--data.global_batch_size=4")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "trm_lightning", "test", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(next((tmp_path / "two").rglob("eval_details.json")).read_text())
    assert json.loads(next((tmp_path / "two").rglob("submission.json")).read_text()) == one_submission
    for method in ("no adaptation", "context", "finetune"):
        counts = [{k: (r["solved"], r["tasks"]) for k, r in d["results"][method]["pass_at_k"].items()} for d in (one, two)]
        assert counts[0] == counts[1], method
    assert two["results"]["context"]["tasks_adapted"] == 6  # each task adapted once, on the rank that holds it
