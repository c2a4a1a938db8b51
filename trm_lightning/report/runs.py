"""Finding run directories under a folder and reading what a run left behind.

A run directory is what ``TensorBoardLogger`` makes: ``<runs>/<name>/version_<n>/`` holding ``config.yaml``
(LightningCLI), ``events.out.tfevents.*``, and where present ``experiment.json`` (config files, hypothesis),
``status.json`` (:mod:`callbacks.run_status`), ``alerts.jsonl`` (:mod:`callbacks.collapse_alert`),
``eval_details.json`` (``trm test``) and ``fewshot_eval.json`` (the held-out-rule benchmark); the names are
:mod:`trm_lightning.run_files`. Anything else met on the way is skipped with a one-line reason.

Steps: TensorBoard stores a value logged during optimizer step k (1-based) at step k - 1; this module adds 1,
so every step here is an optimizer step, the unit of ``alerts.jsonl`` and ``trainer.global_step``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from callbacks.run_status import read_status
from trm_lightning.report.config_diff import flatten_config
from trm_lightning.run_files import (
    ALERTS_FILE,
    CONFIG_FILE,
    EVAL_DETAILS_FILE,
    EVENTS_PREFIX,
    EXPERIMENT_FILE,
    FEWSHOT_EVAL_FILE,
    REPORT_CSV,
    REPORT_MARKDOWN,
    RUN_FILES,
)

VERSION_DIR = re.compile(r"version_\d+$")
REPORT_FILES = {REPORT_MARKDOWN, REPORT_CSV}  # a folder holding both is a report's output, never scanned

Series = list[tuple[int, float]]


class NotARun(Exception):
    """A directory that looked like a run but cannot be reported; the message is the one-line reason."""


@dataclass
class Skipped:
    """Something under the runs folder that is not in the report, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.reason}"


@dataclass
class Run:
    """Everything one run directory holds that the report uses."""

    id: str  # the path under the runs folder, e.g. "E2_lr/version_0"
    path: Path
    config: dict[str, Any]
    flat_config: dict[str, Any]
    experiment: dict[str, Any]
    status: dict[str, dict]
    alerts: list[dict]
    scalars: dict[str, Series]
    wall_times: tuple[float, float] | None  # first and last event, unix seconds
    eval_details: dict | None
    fewshot: dict | None  # fewshot_eval.json: the held-out-rule benchmark's counts
    last_write: float  # newest modification time of the run's files

    @property
    def hypothesis(self) -> str | None:
        return self.experiment.get("hypothesis")


def natural_key(text: str) -> list:
    """Sort key with numbers compared as numbers (E2 < E10, version_2 < version_10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_run_dir(path: Path, files: list[str]) -> bool:
    return bool(VERSION_DIR.match(path.name)) or any(f in RUN_FILES or f.startswith(EVENTS_PREFIX) for f in files)


def discover(runs_dir: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[Path], list[Skipped]]:
    """Run directories under ``runs_dir`` (not descending into them), and the files and empty folders met outside
    any run. Hidden entries, the ``exclude`` folders and earlier reports' folders are passed over silently."""
    excluded = {p.resolve() for p in exclude}
    if _is_run_dir(runs_dir, [p.name for p in runs_dir.iterdir() if p.is_file()]):
        return [runs_dir], []  # pointed at one run
    found: list[Path] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(runs_dir):
        here = Path(dirpath)
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded),
                             key=natural_key)
        files = sorted(f for f in filenames if not f.startswith("."))
        if REPORT_FILES <= set(files):  # an earlier report's output folder
            dirnames[:] = []
            continue
        if here != runs_dir and _is_run_dir(here, files):
            found.append(here)
            dirnames[:] = []
            continue
        if len(files) == 1:
            skipped.append(Skipped(_rel(here / files[0], runs_dir), "not a run directory (a file outside any run)"))
        elif files:  # one line per folder, however many files it holds (a few-shot data folder has thousands)
            where = _rel(here, runs_dir) + "/" if here != runs_dir else "./"
            skipped.append(Skipped(where, f"not a run directory ({len(files)} files outside any run)"))
        if here != runs_dir and not dirnames and not files:
            skipped.append(Skipped(_rel(here, runs_dir), "empty directory"))
    return sorted(found, key=lambda p: natural_key(_rel(p, runs_dir))), skipped


def _rel(path: Path, root: Path) -> str:
    """``path`` under ``root``; ``root`` itself (a single run) as its last two parts, ``<name>/version_<n>``."""
    return path.relative_to(root).as_posix() if path != root else "/".join(path.resolve().parts[-2:])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_alerts(run_dir: Path) -> list[dict]:
    """The records of ``alerts.jsonl`` in file order; a torn last line (a run killed mid-write) is dropped."""
    path = run_dir / ALERTS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record and "rule" in record:
            records.append(record)
    return records


def read_scalars(run_dir: Path) -> tuple[dict[str, Series], tuple[float, float] | None]:
    """Every scalar of the run's event files as (optimizer step, value), and the first and last wall time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # torn last records are expected of live runs
    guidance = {"scalars": 0, "histograms": 1, "images": 1, "audio": 1, "tensors": 1, "compressedHistograms": 1}
    accumulator = EventAccumulator(str(run_dir), size_guidance=guidance)
    accumulator.Reload()
    scalars: dict[str, Series] = {}
    walls: list[float] = []
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        scalars[tag] = [(int(e.step) + 1, float(e.value)) for e in events]
        walls += [events[0].wall_time, events[-1].wall_time] if events else []
    return scalars, ((min(walls), max(walls)) if walls else None)


def load_run(run_dir: Path, runs_dir: Path) -> Run:
    """Read one run directory; raises :class:`NotARun` with the reason when it cannot be reported."""
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file())
    events = [f for f in files if f.startswith(EVENTS_PREFIX)]
    if CONFIG_FILE not in files:
        raise NotARun("no config.yaml (a half-written run, or not one made by `trm fit`)")
    if not events:
        raise NotARun("no TensorBoard event file")
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise NotARun(f"config.yaml is not readable YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise NotARun("config.yaml does not hold a mapping")
    try:
        scalars, walls = read_scalars(run_dir)
    except Exception as err:  # noqa: BLE001  (tensorboard raises several kinds on corrupt files)
        raise NotARun(f"event file unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    experiment = _read_json(run_dir / EXPERIMENT_FILE)
    details = _read_json(run_dir / EVAL_DETAILS_FILE)
    fewshot = _read_json(run_dir / FEWSHOT_EVAL_FILE)
    mtimes = [(run_dir / f).stat().st_mtime for f in files]
    return Run(
        id=_rel(run_dir, runs_dir),
        path=run_dir,
        config=config,
        flat_config=flatten_config(config),
        experiment=experiment if isinstance(experiment, dict) else {},
        status=read_status(run_dir),
        alerts=read_alerts(run_dir),
        scalars=scalars,
        wall_times=walls,
        eval_details=details if isinstance(details, dict) else None,
        fewshot=fewshot if isinstance(fewshot, dict) and isinstance(fewshot.get("scores"), dict) else None,
        last_write=max(mtimes),
    )


def load_runs(runs_dir: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[Run], list[Skipped]]:
    """Every reportable run under ``runs_dir`` and everything skipped; never raises for one bad run."""
    paths, skipped = discover(runs_dir, exclude)
    runs: list[Run] = []
    for path in paths:
        try:
            runs.append(load_run(path, runs_dir))
        except NotARun as err:
            skipped.append(Skipped(_rel(path, runs_dir), str(err)))
        except Exception as err:  # noqa: BLE001  (one broken run never takes the report down)
            skipped.append(Skipped(_rel(path, runs_dir), f"unreadable ({type(err).__name__}: {err})"))
    return runs, sorted(skipped, key=lambda s: natural_key(s.path))
