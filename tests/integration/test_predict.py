"""``trm predict``: a Kaggle submission for tasks without known outputs, voted over the chosen augmentations."""

from __future__ import annotations

import json

from tests.integration.helpers import tiny_args
from trm_lightning.cli import main
from trm_lightning.data.arc import load_source
from trm_lightning.evaluation import validate_submission


def test_predict_writes_a_submission_for_unlabelled_tasks(tmp_path, capsys, synthetic_task_dir, synthetic_eval_dir):
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path / "fit", "--trainer.max_steps=2")])
    ckpt = next((tmp_path / "fit").rglob("last.ckpt"))
    hidden = tmp_path / "hidden"  # the evaluation tasks with their test outputs removed
    hidden.mkdir()
    for path in sorted(synthetic_eval_dir.glob("*.json")):
        task = json.loads(path.read_text())
        task["test"] = [{"input": pair["input"]} for pair in task["test"]]
        (hidden / path.name).write_text(json.dumps(task))
    capsys.readouterr()
    main(["predict", *tiny_args(synthetic_task_dir, hidden, tmp_path / "predict", f"--ckpt_path={ckpt}",
                                "--data.test_augmentations=dihedral", "--trainer.logger.init_args.name=predict")])
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("predict:")]
    tasks = load_source(str(hidden))
    n_inputs = sum(len(t.test) for t in tasks)
    assert line.startswith(f"predict: {len(tasks)} tasks, votes from {n_inputs * 8} rows")  # 8 dihedral versions
    run = next((tmp_path / "predict").rglob("submission.json")).parent
    submission = json.loads((run / "submission.json").read_text())
    validate_submission(submission, tasks)
    assert sorted(submission) == sorted(t.task_id for t in tasks)
    details = json.loads((run / "eval_details.json").read_text())
    assert details["tasks_evaluated"] == 0 and details["rows"] == n_inputs * 8  # nothing to score, all voted
    assert all(inp["labelled"] is False and inp["votes"] == 8 for t in details["tasks"] for inp in t["test_inputs"])
