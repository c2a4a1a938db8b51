"""Bad input and faults: each a one-line ``trm: error:`` (exit 2), and no existing checkpoint is touched."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from tests.integration.helpers import tiny_args
from trm_lightning.cli import main


def _error(capsys, *args: str) -> str:
    """Run ``trm`` in-process; return its one error line (and check the exit status and the absence of a traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("trm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_task_dir, synthetic_eval_dir):
    """A 2-step tiny run (logger version 0) and its last.ckpt."""
    out = tmp_path_factory.mktemp("run")
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, out, "--trainer.max_steps=2",
                            "--trainer.val_check_interval=2", "--trainer.logger.init_args.version=0")])
    run_dir = out / "trm" / "version_0"  # the default logger name
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    return out, run_dir, last


def test_missing_ckpt_path(capsys, tmp_path, synthetic_task_dir, synthetic_eval_dir):
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path,
                                            f"--ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert line == f"trm: error: --ckpt_path {tmp_path / 'nope.ckpt'}: no such file"


def test_corrupted_ckpt_path(capsys, tmp_path, finished_run, synthetic_task_dir, synthetic_eval_dir):
    _, _, last = finished_run
    before = _digest(last)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a save cut off half way
    for sub in ("fit", "test"):
        line = _error(capsys, sub, *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path,
                                              f"--ckpt_path={broken}"))
        assert f"--ckpt_path {broken}: not a readable checkpoint" in line
    assert _digest(last) == before


def test_checkpoint_of_another_config(capsys, tmp_path, finished_run, synthetic_task_dir, synthetic_eval_dir):
    _, _, last = finished_run
    before = _digest(last)
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--ckpt_path={last}",
                                            "--trainer.max_steps=4", "--model.hidden_size=64"))
    assert f"--ckpt_path {last}: the checkpoint was trained with another model configuration: hidden_size=32 (config: 64)" in line
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--ckpt_path={last}",
                                            "--trainer.max_steps=4", "--model.context_broadcast=true"))
    assert "another model configuration: context_broadcast=False (config: True)" in line
    assert _digest(last) == before


def test_checkpoint_of_another_conditioner_config(capsys, tmp_path, finished_run, synthetic_task_dir, synthetic_eval_dir):
    """A conditioner knob is architecture (named in the error); a runtime option (crop_buckets) is not."""
    _, _, last = finished_run
    before = _digest(last)
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--ckpt_path={last}",
                                            "--trainer.max_steps=4", "--model.conditioner.num_layers=2"))
    assert "another model configuration: conditioner.num_layers=1 (config: 2)" in line
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--ckpt_path={last}",
                                            "--model.conditioner=PuzzleEmbedding"))
    assert ("conditioner=trm_lightning.models.encoder.StandardDemoEncoder "
            "(config: trm_lightning.models.conditioning.PuzzleEmbedding)") in line
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path / "resumed", f"--ckpt_path={last}",
                            "--trainer.max_steps=3", "--model.conditioner.crop_buckets=0")])
    assert _digest(last) == before


def test_existing_run_directory_is_never_reused(capsys, finished_run, synthetic_task_dir, synthetic_eval_dir):
    out, run_dir, last = finished_run
    before = _digest(last)
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, out, "--trainer.max_steps=2",
                                            "--trainer.logger.init_args.version=0"))
    assert f"the run directory {run_dir} already holds a run" in line
    assert _digest(last) == before
    # without a version, the same command starts version_1 beside it
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, out, "--trainer.max_steps=1")])
    assert (run_dir.parent / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert _digest(last) == before


def test_empty_data_directory(capsys, tmp_path, synthetic_eval_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _error(capsys, "fit", *tiny_args(empty, synthetic_eval_dir, tmp_path))
    assert str(empty) in line


def test_evaluation_set_overlapping_training_tasks(capsys, tmp_path, synthetic_task_dir):
    # the firewall drops every training task that is also an evaluation task: here all of them
    copy = tmp_path / "same_tasks"
    shutil.copytree(synthetic_task_dir, copy)
    line = _error(capsys, "fit", *tiny_args(synthetic_task_dir, copy, tmp_path))
    assert "no training tasks left" in line and "12 shared with eval" in line
