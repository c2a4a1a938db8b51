"""The seed's experiment table: each overlay changes exactly what its row says, on top of the E0 baseline."""

from __future__ import annotations

import pytest
import yaml

from tests.integration.helpers import ROOT
from trm_lightning.cli import build_cli

BASE = str(ROOT / "configs" / "arc1" / "encoder_trm.yaml")
EXP = ROOT / "configs" / "experiments"

# row of the seed's table -> the resolved keys it must change (besides the run name)
EXPECTED = {
    "E0_baseline": {},
    "E1_overfit": {"data.max_train_puzzles": 10, "data.global_batch_size": 10, "data.episodes_per_epoch": 1000,
                   "trainer.val_check_interval": 100},
    "E2_lr": {"model.lr": 3e-5},
    "E3_grad_clip": {"trainer.gradient_clip_val": 1.0},
    "E4_lr_clip": {"model.lr": 3e-5, "trainer.gradient_clip_val": 1.0},
    "E5_encoder_depth": {"model.conditioner.init_args.num_layers": 4},
    "E6_output_tokens": {"model.puzzle_emb_len": 32},
    "E7_attention_pooling": {"model.conditioner.init_args.pooling_method": "attention"},
    "E8_set_layers": {"model.conditioner.init_args.set_layers": 2},
    "E9_layer_scale": {"model.conditioner.init_args.layer_scale_init": 1e-4},
    "E10_pre_norm": {"model.conditioner.init_args.norm_style": "pre"},
    "E11_encoder_lr_scale": {"model.encoder_lr_scale": 0.1},
    "E12_transform_diff": {"model.conditioner.init_args.transform": "diff"},
    "E13_transform_cross": {"model.conditioner.init_args.transform": "cross"},
    "E14_test_conditioning": {"model.conditioner.init_args.test_conditioning": True},
    "E15_encoder_first": {"model.freeze_trm_steps": 5000},
    "E16_leave_one_out": {"data.leave_one_out_prob": 0.5},
    "E_combined": {"model.lr": 3e-5, "trainer.gradient_clip_val": 1.0, "model.conditioner.init_args.num_layers": 4,
                   "model.conditioner.init_args.pooling_method": "attention", "model.conditioner.init_args.set_layers": 2,
                   "model.conditioner.init_args.layer_scale_init": 1e-4, "model.conditioner.init_args.norm_style": "pre"},
}


def _same(value, expected) -> bool:
    """Numbers compare approximately (YAML floats), everything else exactly."""
    if isinstance(expected, float):
        return value == pytest.approx(expected)
    return value == expected


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resolved(capsys, *configs: str) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", c]
    with pytest.raises(SystemExit):
        build_cli([*args, "--print_config"])
    return _flatten(yaml.safe_load(capsys.readouterr().out))


def test_every_row_has_a_config():
    assert sorted(p.stem for p in EXP.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_changes_exactly_its_row(name, capsys):
    base = _resolved(capsys, BASE)
    exp = _resolved(capsys, BASE, str(EXP / f"{name}.yaml"))
    changed = {k: v for k, v in exp.items() if base.get(k) != v and k != "trainer.logger.init_args.name"}
    assert set(changed) == set(EXPECTED[name])
    for key, value in EXPECTED[name].items():
        assert _same(changed[key], value), key
    assert exp["trainer.logger.init_args.name"] == name
    first_line = (EXP / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# E"), "each file opens with its hypothesis line"


TINY_OVERRIDES = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.fast_dev_run=2",
    "--model.hidden_size=32", "--model.num_heads=4", "--data.canvas_size=6", "--data.max_demos=4",
    "--data.num_workers=0", "--data.eval_batch_size=8", "--data.val_seen_puzzles=2", "--progress_bar.refresh_rate=0",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_runs_two_steps(name, tmp_path, synthetic_task_dir, synthetic_eval_dir):
    """Each overlay trains 2 steps (fast_dev_run) with tiny sizes; its own changes stay in force."""
    gb = [] if name == "E1_overfit" else ["--data.global_batch_size=4", "--data.episodes_per_epoch=8"]
    cli = build_cli([
        "fit", "--config", BASE, "--config", str(EXP / f"{name}.yaml"), *TINY_OVERRIDES, *gb,
        f"--data.train_source={synthetic_task_dir}", f"--data.eval_source={synthetic_eval_dir}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])
    assert cli.trainer.global_step == 2
    for key, value in EXPECTED[name].items():
        section, attr = key.split(".", 1)
        if section == "model":
            stored = cli.model.hparams
            for part in attr.split("."):  # conditioner.init_args.<knob> is nested
                stored = stored[part]
            assert _same(stored, value), key
        elif section == "data" and attr != "episodes_per_epoch":
            assert getattr(cli.datamodule, attr) == value, key
        elif key == "trainer.gradient_clip_val":
            assert cli.trainer.gradient_clip_val == value
