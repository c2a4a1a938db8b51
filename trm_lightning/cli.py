"""The ``trm`` command: LightningCLI over TRMLitModule and ARCDataModule.

``trm fit --config configs/demo.yaml``, ``trm fit --config a.yaml --config b.yaml --model.lr 3e-5``,
``trm fit --config configs/demo.yaml --print_config``. Always-on callbacks are their own config sections
(``checkpoint:`` best validation, ``last_checkpoint:`` last.ckpt for resuming, ``lr_monitor:``,
``progress_bar:``) so a ``trainer.callbacks`` list in a YAML adds to them instead of silently dropping them.
"""

from __future__ import annotations

import os
import sys
import zipfile

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI

from callbacks.last_checkpoint import LastCheckpoint
from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.errors import ConfigError, TRMError
from trm_lightning.module import ARCHITECTURE_KEYS, TRMLitModule

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


    # ------------------------------------------------------------------ checks before any work starts
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything runs: it must exist, be a readable checkpoint, and hold a model
        of the configured architecture (else one clear error).

        This replaces LightningCLI's default, which silently overwrites the config's model arguments with the
        checkpoint's: here the config stays what the user wrote (a changed ``lr`` for fine-tuning is kept)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or path in ("last", "best", "hpc", "registry"):
            return
        if not os.path.isfile(path):
            raise ConfigError(f"--ckpt_path {path}: no such file")
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as err:
            raise ConfigError(f"--ckpt_path {path}: not a readable checkpoint (truncated or corrupted: {err})") from None
        if bad is not None:
            raise ConfigError(f"--ckpt_path {path}: corrupted checkpoint (bad CRC in {bad})")
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        config = self.config[subcommand]
        wanted = {k: config["model"].get(k) for k in ARCHITECTURE_KEYS}
        wanted["canvas_size"] = config["data"]["canvas_size"]  # linked from the data
        differ = [
            f"{k}={saved[k]!r} (config: {v!r})"
            for k, v in wanted.items()
            if k in saved and v is not None and k != "num_puzzle_ids" and saved[k] != v
        ]
        if differ:
            raise ConfigError(
                f"--ckpt_path {path}: the checkpoint was trained with another model configuration: "
                + ", ".join(differ) + "; pass the run's own config.yaml with --config"
            )

    def _check_run_dir(self) -> None:
        """A run never writes into an existing run directory (an explicit ``logger.version`` that is taken)."""
        logger = self.trainer.logger
        version = getattr(logger, "_version", None)
        root = getattr(logger, "root_dir", None)
        if version is None or not isinstance(root, (str, os.PathLike)):
            return  # no logger (or fast_dev_run's dummy), or a fresh version number chosen by the logger
        name = version if isinstance(version, str) else f"version_{version}"
        run_dir = os.path.join(root, name)
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise ConfigError(
                f"the run directory {run_dir} already holds a run; leave trainer.logger.init_args.version unset "
                "for a new version directory (resuming with --ckpt_path also logs to a new one)"
            )

    def before_fit(self) -> None:
        self._check_run_dir()


def build_cli(args: ArgsType = None, run: bool = True) -> TRMCLI:
    """Build (and by default run) the CLI; tests call this with ``args=[...]``."""
    return TRMCLI(
        TRMLitModule,
        ARCDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": False},  # never over another run's config.yaml
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
