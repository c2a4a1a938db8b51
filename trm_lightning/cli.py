"""The ``trm`` command: LightningCLI over TRMLitModule and ARCDataModule.

``trm fit --config configs/demo.yaml``, ``trm fit --config a.yaml --config b.yaml --model.lr 3e-5``,
``trm fit --config configs/demo.yaml --print_config``. Always-on callbacks are their own config sections
(``checkpoint:`` best validation, ``last_checkpoint:`` last.ckpt for resuming, ``lr_monitor:``,
``progress_bar:``, ``run_status:``) so a ``trainer.callbacks`` list in a YAML adds to them instead of silently
dropping them.

Besides ``config.yaml`` (resolved values), every run directory gets ``experiment.json``: the ``--config`` files
in order and the hypothesis line (:func:`pick_hypothesis`: the opening comment line of the last experiment overlay,
as every ``configs/experiments/*.yaml`` has), and ``status.json`` (:class:`callbacks.run_status.RunStatus`).
``trm report RUNS_DIR`` (:mod:`trm_lightning.report`) reads them; ``main`` hands it ``report`` before
LightningCLI parses anything.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import textwrap
import zipfile
from pathlib import Path

import docstring_parser
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from callbacks.last_checkpoint import LastCheckpoint
from callbacks.run_status import RunStatus
from trm_lightning.architecture import TRM_ARCHITECTURE_KEYS, architecture_mismatch
from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.errors import ConfigError, TRMError
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.module import TRMLitModule
from trm_lightning.metric_names import VAL_EXACT_ACCURACY
from trm_lightning.run_files import CONFIG_FILE, EXPERIMENT_FILE
from trm_lightning.trainer_state import explicit_logger_version

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "trm", "default_hp_metric": False},
}


LIGHTNING_STAMP = re.compile(r"#\s*(lightning|pytorch_lightning|lightning\.pytorch)==")
DESCRIPTION = (
    "Encoder-based Tiny Recursive Models on ARC-AGI (PyTorch Lightning). "
    "Also: `trm report RUNS_DIR [--baseline RUN] [--out DIR]` writes the experiment-tracking table "
    "(report.md, report.csv) and plots from the runs' logs (`trm report --help`)."
)


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, except that a text with line breaks (the epilog listing the conditioner's knobs)
    keeps them instead of being reflowed into one paragraph."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        return "\n".join(indent + line for line in text.splitlines())


def conditioner_help(cls: type = StandardDemoEncoder) -> str:
    """The knobs of the default conditioner, one per line, from its signature and docstring (``trm fit --help``
    lists them: they are the seed's encoder knobs, which ``--model.conditioner.help`` would otherwise hide)."""
    docs = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(cls.__doc__ or "").params}
    lines = textwrap.wrap(f"{cls.__name__} knobs (the default model.conditioner; --model.conditioner.<name> VALUE "
                          "on the command line, model.conditioner.init_args.<name> in YAML):", 100)
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[2:]:  # after self, shape
        wrapped = textwrap.wrap(f"{docs.get(name, '')} (default: {param.default!r})", 96)
        lines += [f"  {name}"] + [f"      {part}" for part in wrapped]
    return "\n".join(lines)


def hypothesis_line(path: str | os.PathLike) -> str | None:
    """The first line of a YAML file without its leading ``#``, when that line is a comment; else None. The
    version stamp LightningCLI writes atop a saved ``config.yaml`` (``# lightning.pytorch==2.6.6``) is not one."""
    try:
        with open(path) as f:
            first = f.readline().strip()
    except OSError:
        return None
    if not first.startswith("#") or LIGHTNING_STAMP.match(first):
        return None
    return first.lstrip("#").strip() or None


def pick_hypothesis(config_files: list[str]) -> str | None:
    """The hypothesis of a run from its ``--config`` files (in order): the opening comment line of the last file in a
    folder named ``experiments``; without one, of the last file not in a ``trainer`` folder (presets say how a run
    runs, not what it tests) that opens with a comment; else None."""
    def last_line(paths: list[str]) -> str | None:
        lines = [h for h in map(hypothesis_line, paths) if h]
        return lines[-1] if lines else None

    folders = [Path(f).parent.name for f in config_files]
    return (last_line([f for f, d in zip(config_files, folders) if d == "experiments"])
            or last_line([f for f, d in zip(config_files, folders) if d != "trainer"]))


class RecordingSaveConfig(SaveConfigCallback):
    """LightningCLI's config saver, which also writes ``experiment.json`` (``--config`` files, hypothesis)."""

    _log_dir: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved:
            self._log_dir = trainer.log_dir  # a broadcast under DDP: every rank, never inside save_config
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Rank 0 only: write ``experiment.json`` beside ``config.yaml``."""
        if self._log_dir is None:
            return
        files = [getattr(p, "absolute", None) or os.path.abspath(str(p)) for p in (self.config.get("config") or [])]
        record = {"stage": stage, "config_files": files, "hypothesis": pick_hypothesis(files)}
        Path(self._log_dir, EXPERIMENT_FILE).write_text(json.dumps(record, indent=1) + "\n")


class TRMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.canvas_size", "model.canvas_size")
        # the puzzle-id table's size depends on the tasks loaded: known once the datamodule exists
        parser.link_arguments("data.num_puzzle_ids", "model.num_puzzle_ids", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": VAL_EXACT_ACCURACY,
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt is last_checkpoint's
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.filename": f"step{{step}}-val_exact{{{VAL_EXACT_ACCURACY}:.4f}}",
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(TQDMProgressBar, "progress_bar")
        parser.set_defaults({"progress_bar.refresh_rate": 10})
        parser.add_lightning_class_args(RunStatus, "run_status")


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
        wanted = {k: config["model"].get(k) for k in (*TRM_ARCHITECTURE_KEYS, "conditioner") if k != "num_puzzle_ids"}
        wanted["canvas_size"] = config["data"]["canvas_size"]  # linked from the data; num_puzzle_ids is not known yet
        differ = architecture_mismatch(saved, wanted)
        if differ:
            raise ConfigError(
                f"--ckpt_path {path}: the checkpoint was trained with another model configuration: "
                + ", ".join(differ) + "; pass the run's own config.yaml with --config"
            )

    def _check_run_dir(self) -> None:
        """A run never writes into an existing run directory (an explicit ``logger.version`` that is taken)."""
        logger = self.trainer.logger
        version = explicit_logger_version(logger)
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
        save_config_callback=RecordingSaveConfig,
        save_config_kwargs={"overwrite": False, "config_filename": CONFIG_FILE},  # never over another run's
        seed_everything_default=0,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        parser_kwargs={
            "description": DESCRIPTION,
            **{sub: {"epilog": conditioner_help(), "formatter_class": HelpFormatter}
               for sub in ("fit", "validate", "test", "predict")},
        },
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Console entry point: user-facing errors become one ``trm: error: ...`` line (exit status 2), and a
    failed gate its verdict line (exit status 1), instead of a traceback. ``trm report ...`` goes to
    :func:`trm_lightning.report.main` (not a LightningCLI subcommand: it trains nothing)."""
    argv = sys.argv[1:] if args is None else args
    try:
        if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
            from trm_lightning.report import main as report_main

            report_main(list(argv[1:]))
            return
        build_cli(args)
    except TRMError as err:
        print(f"{err.prefix}{err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
