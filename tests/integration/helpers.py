"""Helpers to drive the real CLI from tests."""

from __future__ import annotations

from pathlib import Path

from trm_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "conf" / "tiny.yaml")


def tiny_args(train_dir, eval_dir, out_dir, *extra: str) -> list[str]:
    """Arguments (without the subcommand) for the tiny config on synthetic task directories."""
    return [
        "--config", TINY,
        f"--data.train_source={train_dir}",
        f"--data.eval_source={eval_dir}",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        *extra,
    ]


def run_tiny(subcommand: str, train_dir, eval_dir, out_dir, *extra: str):
    """Run ``trm <subcommand>`` on the tiny config; returns the CLI object (model, trainer, datamodule)."""
    return build_cli([subcommand, *tiny_args(train_dir, eval_dir, out_dir, *extra)])


def build_tiny(train_dir, eval_dir, out_dir, *extra: str):
    """Instantiate model, datamodule and trainer without running anything."""
    return build_cli(tiny_args(train_dir, eval_dir, out_dir, *extra), run=False)
