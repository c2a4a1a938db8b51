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
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.last_checkpoint import LastCheckpoint
from callbacks.lr_monitor import LearningRates
from callbacks.run_status import RunStatus
from trm_lightning import lifecycle
from trm_lightning.architecture import TRM_ARCHITECTURE_KEYS, architecture_mismatch
from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.checks import check_at_least, check_range
from trm_lightning.errors import ConfigError, GateFailure, TRMError, buried_in
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


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line, ``trm: error: <what>`` (exit 2), like every other error of
    the command (jsonargparse's own print the whole usage, then a message over several indented lines)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        buried = buried_in(ex) if ex is not None else None  # a check inside a class it instantiated
        text = str(buried) if buried is not None else " ".join(str(message).split())
        print(f"trm: error: {text} (see: {self.prog} --help)" if buried is None
              else f"trm: error: {text}", file=sys.stderr, flush=True)
        sys.exit(2)


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
        parser.add_lightning_class_args(LearningRates, "lr_monitor")
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
        self._check_trainer_config()
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if not path:
            if subcommand in EVALUATING:
                raise ConfigError(
                    f"trm {subcommand} needs --ckpt_path: without one it would score the untrained initial weights "
                    "(pass a run's checkpoint, e.g. --ckpt_path runs/<name>/version_<n>/checkpoints/last.ckpt)"
                )
            return
        if path in ("last", "best", "registry"):
            raise ConfigError(
                f"--ckpt_path {path}: Lightning resolves '{path}' among the checkpoints of this trainer, and a new "
                "`trm` command has none; pass the checkpoint file (runs/<name>/version_<n>/checkpoints/last.ckpt)"
            )
        if path == "hpc":  # SLURM auto-requeue: Lightning finds hpc_ckpt_<n>.ckpt in default_root_dir itself
            return
        checkpoint = read_checkpoint(path)
        saved = checkpoint.get("hyper_parameters", {})
        config = self.config[subcommand]
        trained_batch = checkpoint.get("datamodule_hyper_parameters", {}).get("global_batch_size")
        wanted_batch = config["data"]["global_batch_size"]
        if subcommand == "fit" and trained_batch is not None and trained_batch != wanted_batch:
            raise ConfigError(
                f"--ckpt_path {path}: the run was trained with data.global_batch_size={trained_batch} (config: "
                f"{wanted_batch}); a resume continues the same run, so pass --data.global_batch_size {trained_batch}"
            )
        wanted = {k: config["model"].get(k) for k in (*TRM_ARCHITECTURE_KEYS, "conditioner") if k != "num_puzzle_ids"}
        wanted["canvas_size"] = config["data"]["canvas_size"]  # linked from the data; num_puzzle_ids is not known yet
        differ = architecture_mismatch(saved, wanted)
        if differ:
            raise ConfigError(
                f"--ckpt_path {path}: the checkpoint was trained with another model configuration: "
                + ", ".join(differ) + "; pass the run's own config.yaml with --config"
            )

    def _check_trainer_config(self) -> None:
        """Values of the Trainer section (and the seed) that Lightning would take silently or fail on deep inside;
        run right after parsing, before LightningCLI seeds anything."""
        config = self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config
        seed = config.get("seed_everything")
        if not isinstance(seed, bool) and seed is not None:
            check_range("seed_everything", seed, 0, 2**32 - 1)
        trainer = config["trainer"]
        clip = trainer.get("gradient_clip_val")
        if clip is not None:
            check_at_least("trainer.gradient_clip_val", clip, 0)
        check_at_least("trainer.log_every_n_steps", trainer.get("log_every_n_steps"), 1, allow_none=True)
        check_at_least("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches"), 1)
        steps = trainer.get("max_steps")
        if steps is not None and steps != -1:
            check_at_least("trainer.max_steps (-1: no limit)", steps, 0)

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
        dm, trainer = self.datamodule, self.trainer
        dm.setup("fit")
        if trainer.limit_val_batches != 0 and dm.data_summary.get("eval_queries", 0) == 0:
            raise ConfigError(
                f"data.eval_source={dm.eval_source}: no held-out evaluation episode (no task fits the canvas, "
                "data.max_eval_puzzles is 0, or no test output is known; see the eval: line above), so validation "
                "has nothing to score; set --trainer.limit_val_batches 0 to train without it"
            )
        best = self._get(self.config_init, "checkpoint")
        if trainer.limit_val_batches == 0 and best is not None and best.monitor is not None:
            # nothing to monitor: the best-validation checkpoint would be named after a metric that never exists
            # (one with monitor=null, a checkpoint every N steps, still runs)
            trainer.callbacks[:] = [cb for cb in trainer.callbacks if cb is not best]

    def before_validate(self) -> None:
        self._before_evaluation("validate")

    def before_test(self) -> None:
        self._before_evaluation("test")

    def before_predict(self) -> None:
        self._before_evaluation("predict")

    def _before_evaluation(self, subcommand: str) -> None:
        """Never into an existing run's directory, and never an empty evaluation (one clear line instead)."""
        self._check_run_dir()
        dm = self.datamodule
        dm.setup(subcommand)
        if subcommand == "predict":
            if not dm.eval_tasks:
                raise ConfigError(f"data.eval_source={dm.eval_source}: no evaluation task to predict (see the eval: "
                                  "line above)")
        elif dm.data_summary.get("eval_queries", 0) == 0:
            raise ConfigError(
                f"data.eval_source={dm.eval_source}: no evaluation task with a known test output (see the eval: line "
                f"above), so trm {subcommand} has nothing to score; `trm predict` writes a submission without outputs"
            )

    def after_fit(self) -> None:
        """A gate that failed (a callback with ``passed`` False, the overfit gate) ends the command with its verdict
        line and exit status 1, after the run finished and recorded itself."""
        failed = [cb.verdict for cb in self.trainer.callbacks if getattr(cb, "passed", None) is False]
        if failed:
            raise GateFailure("\n".join(failed))


EVALUATING = ("validate", "test", "predict")


def config_files(argv: list[str]) -> list[str]:
    """The paths given to ``--config`` / ``-c`` in ``argv`` (``--config X``, ``--config=X``, ``-c X``)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(str(argv[i + 1]))
        elif isinstance(arg, str) and arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_file(path: str) -> None:
    """A ``--config`` file must exist and be a UTF-8 YAML mapping; else one line that says which file and why (what
    jsonargparse would print is a bare ``Unexpected config:`` or a ``UnicodeDecodeError`` traceback)."""
    if path.lstrip().startswith("{"):  # an inline config string, jsonargparse parses it
        return
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                          "save it as UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if loaded is None:
        raise ConfigError(f"--config {path}: the file is empty (or only comments)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys (such as model: / data: / trainer:), got a "
                          f"{type(loaded).__name__}")


def read_checkpoint(path: str) -> dict:
    """The Lightning checkpoint at ``path`` (memory-mapped); one ``ConfigError`` line for anything else (no such file,
    a truncated or corrupted file, a zip or torch file that is not a Lightning checkpoint)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt_path {path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"--ckpt_path {path}: not a readable checkpoint (truncated or corrupted: {err})") from None
    if bad is not None:
        raise ConfigError(f"--ckpt_path {path}: corrupted checkpoint (bad CRC in {bad})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (a zip that torch cannot read: one line)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--ckpt_path {path}: not a PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(saved, dict) or "state_dict" not in saved or "pytorch-lightning_version" not in saved:
        what = f"a {type(saved).__name__}" if not isinstance(saved, dict) else "a dict without Lightning's keys"
        raise ConfigError(
            f"--ckpt_path {path}: not a Lightning checkpoint ({what}: a plain torch.save of weights has no "
            "optimizer, loop or data state to resume); pass a checkpoints/*.ckpt file of a `trm fit` run"
        )
    return saved


def build_cli(args: ArgsType = None, run: bool = True) -> TRMCLI:
    """Build (and by default run) the CLI; tests call this with ``args=[...]``."""
    return TRMCLI(
        TRMLitModule,
        ARCDataModule,
        auto_configure_optimizers=False,
        parser_class=ArgumentParser,
        save_config_callback=RecordingSaveConfig,
        save_config_kwargs={"overwrite": False, "config_filename": CONFIG_FILE},  # never over another run's
        seed_everything_default=0,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        parser_kwargs={
            "prog": "trm",
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
        if isinstance(argv, (list, tuple)):
            for path in config_files(list(argv)):
                check_config_file(path)
        build_cli(args)
    except TRMError as err:
        _exit_with(err)
    except KeyboardInterrupt:  # Ctrl-C before or after training (inside it Lightning turns it into an exit)
        print("trm: interrupted (SIGINT)", file=sys.stderr, flush=True)
        sys.exit(lifecycle.exit_status("SIGINT"))
    except SystemExit as end:
        name = lifecycle.stop_signal()
        if name is None and isinstance(end, SIGTERMException):
            name = "SIGTERM"
        if name is None:
            raise
        print(f"trm: stopped by {name}", file=sys.stderr, flush=True)
        sys.exit(lifecycle.exit_status(name))
    except Exception as err:  # noqa: BLE001  (re-raised unless it carries one of ours)
        buried = buried_in(err)
        if buried is None:
            raise
        _exit_with(buried)


def _exit_with(err: TRMError) -> None:
    print(f"{err.prefix}{err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)
