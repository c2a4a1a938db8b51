"""The parts of ``trm report`` that need no run: the Change column (callbacks keyed by class, whole sections as one
change, log locations ignored), the hypothesis line a run records, the natural order of run ids."""

from __future__ import annotations

from pathlib import Path

from trm_lightning.cli import hypothesis_line, pick_hypothesis
from trm_lightning.report.config_diff import config_diff, flatten_config
from trm_lightning.report.runs import natural_key

DIAG = {"class_path": "callbacks.EncoderDiagnostics", "init_args": {"every_n_steps": 10, "probe_tasks": 16}}
ALERT = {"class_path": "callbacks.CollapseAlert", "init_args": {"warmup_steps": 50}}


def _config(lr=1e-4, callbacks=(DIAG,), name="E0", clip=None):
    return {
        "seed_everything": 0,
        "trainer": {"gradient_clip_val": clip, "callbacks": list(callbacks), "devices": [0, 1],
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "/tmp/x", "name": name, "version": None}}},
        "model": {"lr": lr, "encoder_norm_style": "post"},
        "ckpt_path": None,
    }


def test_flatten_keys_callbacks_by_class_and_keeps_plain_lists():
    flat = flatten_config(_config(callbacks=(DIAG, ALERT, ALERT)))
    assert flat["trainer.callbacks.EncoderDiagnostics.init_args.every_n_steps"] == 10
    assert flat["trainer.callbacks.CollapseAlert.init_args.warmup_steps"] == 50
    assert flat["trainer.callbacks.CollapseAlert#2.class_path"] == "callbacks.CollapseAlert"
    assert flat["trainer.devices"] == [0, 1] and flat["trainer.logger.init_args.name"] == "E0"
    assert flat["model.lr"] == 1e-4 and flat["trainer.gradient_clip_val"] is None


def test_diff_shows_values_and_ignores_where_the_logs_go():
    base = flatten_config(_config())
    run = flatten_config(_config(lr=3e-5, name="E4", clip=1.0) | {"ckpt_path": "runs/x/checkpoints/last.ckpt"})
    assert [str(c) for c in config_diff(base, run)] == ["trainer.gradient_clip_val: null → 1",
                                                       "model.lr: 0.0001 → 3e-05"]
    assert config_diff(base, dict(base)) == []


def test_a_section_added_or_removed_is_one_change():
    base = flatten_config(_config())
    more = flatten_config(_config(callbacks=(DIAG, ALERT)))
    assert [str(c) for c in config_diff(base, more)] == ["trainer.callbacks.CollapseAlert: added"]
    assert [str(c) for c in config_diff(more, base)] == ["trainer.callbacks.CollapseAlert: removed"]
    changed = flatten_config(_config(callbacks=({**DIAG, "init_args": {"every_n_steps": 5, "probe_tasks": 16}},)))
    assert [str(c) for c in config_diff(base, changed)] == [
        "trainer.callbacks.EncoderDiagnostics.init_args.every_n_steps: 10 → 5"]
    one_key = dict(base, **{"model.encoder_lr_scale": 0.1})
    assert [str(c) for c in config_diff(base, one_key)] == ["model.encoder_lr_scale: (absent) → 0.1"]


def test_hypothesis_line(tmp_path):
    (tmp_path / "e.yaml").write_text("# E2 H2 (learning rate causes distribution shift): lr 1e-4 -> 3e-5.\nmodel: {}\n")
    (tmp_path / "saved.yaml").write_text("# lightning.pytorch==2.6.6\nseed_everything: 0\n")
    (tmp_path / "plain.yaml").write_text("model: {}\n# a later comment\n")
    assert hypothesis_line(tmp_path / "e.yaml") == "E2 H2 (learning rate causes distribution shift): lr 1e-4 -> 3e-5."
    assert hypothesis_line(tmp_path / "saved.yaml") is None  # LightningCLI's version stamp
    assert hypothesis_line(tmp_path / "plain.yaml") is None
    assert hypothesis_line(tmp_path / "missing.yaml") is None


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_hypothesis_is_the_experiment_overlays_line_whatever_the_order():
    base, e2 = str(CONFIGS / "arc1" / "encoder_trm.yaml"), str(CONFIGS / "experiments" / "E2_lr.yaml")
    gpu, demo = str(CONFIGS / "trainer" / "gpu.yaml"), str(CONFIGS / "demo.yaml")
    e2_line = "E2 H2 (learning rate causes distribution shift): lr 1e-4 -> 3e-5."
    assert pick_hypothesis([base, e2, gpu]) == pick_hypothesis([base, gpu, e2]) == e2_line
    assert pick_hypothesis([demo, gpu]) == hypothesis_line(demo)  # a trainer preset is never the hypothesis
    assert pick_hypothesis([gpu]) is None and pick_hypothesis([]) is None


def test_natural_order():
    names = ["E10_pre_norm/version_0", "E2_lr/version_10", "E2_lr/version_2", "E_combined/version_0", "E0_baseline/version_0"]
    assert sorted(names, key=natural_key) == ["E0_baseline/version_0", "E2_lr/version_2", "E2_lr/version_10",
                                              "E10_pre_norm/version_0", "E_combined/version_0"]
