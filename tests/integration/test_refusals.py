"""Every value a user can type is accepted and meaningful, or refused before any work in one line.

Each case runs the real CLI in-process and checks: the exit status (2, or the documented one), exactly one
``trm: error:`` line that names the key or file, no traceback, and that nothing under the runs folder changed (the
sha256 of every file of an existing, finished run, and no new run directory).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import tiny_args
from trm_lightning.cli import main
from trm_lightning.data.synthetic import make_synthetic_tasks
from trm_lightning.data.task_json import task_to_json


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic_task_dir, synthetic_eval_dir):
    """A finished 2-step run (trm/version_0 under ``runs``) and the odd files the cases point at."""
    root = tmp_path_factory.mktemp("refusals")
    runs = root / "runs"
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, runs, "--trainer.max_steps=2",
                            "--trainer.val_check_interval=2", "--trainer.logger.init_args.version=0")])
    last = runs / "trm" / "version_0" / "checkpoints" / "last.ckpt"
    files = root / "files"
    files.mkdir()
    # data: a demo pair whose output is null; evaluation sets with nothing to score
    task = task_to_json(make_synthetic_tasks(1, seed=3, prefix="nul")[0])
    task["train"][0]["output"] = None
    (files / "null_output").mkdir()
    (files / "null_output" / "nul000.json").write_text(json.dumps(task))
    big = {"train": [{"input": [[1] * 9] * 9, "output": [[2] * 9] * 9}], "test": [{"input": [[1] * 9] * 9,
                                                                                     "output": [[2] * 9] * 9}]}
    (files / "too_big").mkdir()
    (files / "too_big" / "big.json").write_text(json.dumps(big))
    unknown = task_to_json(make_synthetic_tasks(1, seed=4, prefix="unk")[0])
    for pair in unknown["test"]:
        del pair["output"]
    (files / "no_outputs").mkdir()
    (files / "no_outputs" / "unk000.json").write_text(json.dumps(unknown))
    # checkpoints that are not Lightning checkpoints
    with zipfile.ZipFile(files / "not_torch.ckpt", "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, files / "state_dict.ckpt")
    torch.save(torch.zeros(3), files / "tensor.ckpt")
    # config files
    (files / "empty.yaml").write_text("# nothing here\n")
    (files / "inf.yaml").write_text("model:\n  lr: .inf\n")
    (files / "latin1.yaml").write_bytes("model:\n  lr: 0.001  # caf\xe9\n".encode("latin-1"))
    return {"runs": runs, "last": last, "files": files, "train": synthetic_task_dir, "eval": synthetic_eval_dir}


def _case(world, *extra: str, sub: str = "fit", train=None, eval_=None) -> list[str]:
    return [sub, *tiny_args(train or world["train"], eval_ or world["eval"], world["runs"], *extra)]


# (id, how to build the arguments, expected exit status, what the error line must contain)
CASES = [
    # 4: bad data
    ("demo_output_null", lambda w: _case(w, train=w["files"] / "null_output"), 2, "train pair 0: 'output' is null"),
    # 5: evaluation sets with nothing to score
    ("fit_max_eval_puzzles_0", lambda w: _case(w, "--data.max_eval_puzzles=0"), 2, "no held-out evaluation episode"),
    ("fit_eval_too_big", lambda w: _case(w, eval_=w["files"] / "too_big"), 2, "no held-out evaluation episode"),
    ("fit_eval_no_outputs", lambda w: _case(w, eval_=w["files"] / "no_outputs"), 2, "no held-out evaluation episode"),
    ("test_nothing_to_score", lambda w: _case(w, "--data.max_eval_puzzles=0", f"--ckpt_path={w['last']}", sub="test"),
     2, "no evaluation task with a known test output"),
    # 6: hyperparameters out of range, checked where they are taken
    ("lr_negative", lambda w: _case(w, "--model.lr=-0.001"), 2, "model.lr must be >= 0, got -0.001"),
    ("lr_nan", lambda w: _case(w, "--model.lr=nan"), 2, 'Parser key "model.lr": Expected a <class \'float\'>'),
    ("lr_inf_in_yaml", lambda w: _case(w, "--config", str(w["files"] / "inf.yaml")), 2,
     "model.lr must be a finite number, got inf"),
    ("weight_decay_negative", lambda w: _case(w, "--model.weight_decay=-0.1"), 2, "model.weight_decay must be >= 0"),
    ("beta1_one", lambda w: _case(w, "--model.beta1=1.0"), 2, "model.beta1 must be in [0.0, 1.0), got 1.0"),
    ("halt_max_steps_0", lambda w: _case(w, "--model.halt_max_steps=0"), 2, "model.halt_max_steps must be >= 1"),
    ("H_cycles_0", lambda w: _case(w, "--model.H_cycles=0"), 2, "model.H_cycles must be >= 1, got 0"),
    ("puzzle_emb_len_0", lambda w: _case(w, "--model.puzzle_emb_len=0"), 2, "model.puzzle_emb_len must be >= 1"),
    ("hidden_not_divisible", lambda w: _case(w, "--model.hidden_size=30"), 2,
     "model.hidden_size=30 must be divisible by model.num_heads=4"),
    ("hidden_size_0", lambda w: _case(w, "--model.hidden_size=0"), 2, "model.hidden_size must be >= 1, got 0"),
    ("odd_head_dim", lambda w: _case(w, "--model.hidden_size=36"), 2, "must be even"),
    ("rope2d_head_dim", lambda w: _case(w, "--model.hidden_size=40", "--model.pos_encoding=rope2d"), 2,
     "model.pos_encoding=rope2d needs model.hidden_size / model.num_heads divisible by 4, got 10"),
    ("rope2d_encoder_head_dim", lambda w: _case(w, "--model.hidden_size=40", "--model.conditioner.pos_encoding=rope2d"),
     2, "model.conditioner.pos_encoding=rope2d needs model.hidden_size / model.num_heads divisible by 4, got 10"),
    ("seed_negative", lambda w: _case(w, "--seed_everything=-1"), 2, "seed_everything must be in [0, 4294967295]"),
    ("lr_min_ratio_negative", lambda w: _case(w, "--model.lr_min_ratio=-1"), 2, "model.lr_min_ratio must be in [0.0"),
    ("encoder_lr_scale_negative", lambda w: _case(w, "--model.encoder_lr_scale=-1"), 2,
     "model.encoder_lr_scale must be >= 0"),
    ("exploration_2", lambda w: _case(w, "--model.halt_exploration_prob=2"), 2,
     "model.halt_exploration_prob must be in [0.0, 1.0], got 2.0"),
    ("warmup_negative", lambda w: _case(w, "--model.lr_warmup_steps=-5"), 2, "model.lr_warmup_steps must be >= 0"),
    ("clip_negative", lambda w: _case(w, "--trainer.gradient_clip_val=-1"), 2, "trainer.gradient_clip_val must be >= 0"),
    ("loss_weight_negative", lambda w: _case(w, "--model.q_halt_loss_weight=-1"), 2,
     "model.q_halt_loss_weight must be >= 0"),
    ("set_layers_0", lambda w: _case(w, "--model.conditioner.set_layers=0"), 2, "model.conditioner.set_layers must be >= 1"),
    ("leave_one_out_2", lambda w: _case(w, "--data.leave_one_out_prob=2"), 2, "data.leave_one_out_prob must be in"),
    ("callback_argument", lambda w: _case(w, "--trainer.callbacks+=callbacks.GradNorms",
                                          "--trainer.callbacks.every_n_steps=0"), 2, "GradNorms.every_n_steps must be >= 1"),
    ("type_error", lambda w: _case(w, "--model.lr=abc"), 2, 'Parser key "model.lr"'),
    # 7: checkpoints that are not (this run's) Lightning checkpoints
    ("ckpt_zip_not_torch", lambda w: _case(w, f"--ckpt_path={w['files'] / 'not_torch.ckpt'}"), 2,
     "not a PyTorch checkpoint"),
    ("ckpt_plain_state_dict", lambda w: _case(w, f"--ckpt_path={w['files'] / 'state_dict.ckpt'}"), 2,
     "not a Lightning checkpoint (a dict without Lightning's keys"),
    ("ckpt_bare_tensor", lambda w: _case(w, f"--ckpt_path={w['files'] / 'tensor.ckpt'}"), 2,
     "not a Lightning checkpoint (a Tensor"),
    ("ckpt_best", lambda w: _case(w, "--ckpt_path=best", sub="test"), 2, "--ckpt_path best: Lightning resolves 'best'"),
    ("resume_other_batch", lambda w: _case(w, f"--ckpt_path={w['last']}", "--data.global_batch_size=8",
                                           "--data.episodes_per_epoch=16"), 2,
     "trained with data.global_batch_size=4 (config: 8)"),
    # 8: evaluation of untrained weights; evaluation into a finished run's directory
    ("test_without_ckpt", lambda w: _case(w, sub="test"), 2, "trm test needs --ckpt_path"),
    ("predict_without_ckpt", lambda w: _case(w, sub="predict"), 2, "trm predict needs --ckpt_path"),
    ("validate_without_ckpt", lambda w: _case(w, sub="validate"), 2, "trm validate needs --ckpt_path"),
    ("test_into_existing_run", lambda w: _case(w, f"--ckpt_path={w['last']}", "--trainer.logger.init_args.version=0",
                                               sub="test"), 2, "already holds a run"),
    ("validate_into_existing_run", lambda w: _case(w, f"--ckpt_path={w['last']}",
                                                   "--trainer.logger.init_args.version=0", sub="validate"), 2,
     "already holds a run"),
    # 11: config files
    ("empty_yaml", lambda w: ["fit", "--config", str(w["files"] / "empty.yaml")], 2, "empty.yaml: the file is empty"),
    ("latin1_yaml", lambda w: ["fit", "--config", str(w["files"] / "latin1.yaml")], 2, "latin1.yaml: not UTF-8 text"),
    ("missing_yaml", lambda w: ["fit", "--config", str(w["files"] / "nope.yaml")], 2, "nope.yaml: no such file"),
]


@pytest.mark.parametrize("name, build, status, needle", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_nothing_written(name, build, status, needle, world, capsys):
    before = _tree(world["runs"])
    with pytest.raises(SystemExit) as exit_info:
        main(build(world))
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert needle in lines[0], lines[0]
    assert _tree(world["runs"]) == before  # the finished run untouched, and no new run directory


def test_a_run_without_a_logger_trains(world, tmp_path, monkeypatch):
    """``--trainer.logger false`` is a meaningful value: no TensorBoard, no learning-rate curves, the run's files in
    ``trainer.default_root_dir``."""
    main(_case(world, "--trainer.logger=false", "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "status.json").is_file()
    assert json.loads((tmp_path / "status.json").read_text())["fit"]["status"] == "finished"


def test_without_validation_there_is_no_best_checkpoint(world, tmp_path):
    """``limit_val_batches 0``: no file named after a validation metric that never existed."""
    main(["fit", *tiny_args(world["train"], world["eval"], tmp_path, "--trainer.max_steps=2",
                            "--trainer.limit_val_batches=0")])
    names = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert names == ["last.ckpt"]
