"""The ``trm`` command: LightningCLI over TRMLitModule and ARCDataModule.

``trm fit --config configs/demo.yaml``, ``trm fit --config a.yaml --config b.yaml --model.lr 3e-5``,
``trm fit --config configs/demo.yaml --print_config``. Always-on callbacks are their own config sections
(``checkpoint:`` best validation, ``last_checkpoint:`` last.ckpt for resuming, ``lr_monitor:``,
``progress_bar:``) so a ``trainer.callbacks`` list in a YAML adds to them instead of silently dropping them.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI

from callbacks.last_checkpoint import LastCheckpoint
from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.errors import TRMError
from trm_lightning.module import TRMLitModule

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "trm", "default_hp_metric": False},
}


class TRMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.canvas_size", "model.canvas_size")
        # the puzzle-id table's size depends on the tasks loaded: known once the datamodule exists
        parser.link_arguments("data.num_puzzle_ids", "model.num_puzzle_ids", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/exact_accuracy",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt is last_checkpoint's
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.filename": "step{step}-val_exact{val/exact_accuracy:.4f}",
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(TQDMProgressBar, "progress_bar")
        parser.set_defaults({"progress_bar.refresh_rate": 10})


def build_cli(args: ArgsType = None, run: bool = True) -> TRMCLI:
    """Build (and by default run) the CLI; tests call this with ``args=[...]``."""
    return TRMCLI(
        TRMLitModule,
        ARCDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        parser_kwargs={"description": "Encoder-based Tiny Recursive Models on ARC-AGI (PyTorch Lightning)."},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Console entry point: user-facing errors become one ``trm: error: ...`` line (exit status 2), and a
    failed gate its verdict line (exit status 1), instead of a traceback."""
    try:
        build_cli(args)
    except TRMError as err:
        print(f"{err.prefix}{err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
