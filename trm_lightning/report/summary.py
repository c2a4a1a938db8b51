"""One row of the tracking table per run: status, headline numbers, the end-of-run diagnostics, the config change."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from callbacks.alert_rules import STOPPING_ACTIONS
from trm_lightning import metric_names as names
from trm_lightning.report.config_diff import Change, config_diff
from trm_lightning.report.runs import Run, Series
from trm_lightning.run_files import CHECKPOINT_DIR

#: the diagnostics in the table: the seed's three, the scale-invariant batch statistics, the probe set
DIAGNOSTICS = names.BATCH_DIAGNOSTICS + names.PROBE_DIAGNOSTICS


@dataclass
class Row:
    """The report's facts about one run (None where the run has no such value)."""

    run: str
    stage: str | None
    hypothesis: str | None
    changes: list[Change] | None  # None for the baseline itself
    status: str  # finished | stopped by alert | crashed | interrupted | running | unknown
    status_detail: str
    steps: int | None
    wall_s: float | None
    peak_train_accuracy: float | None
    peak_train_accuracy_step: int | None
    final_train_accuracy: float | None
    best_val_exact_accuracy: float | None
    best_val_exact_accuracy_step: int | None
    arc_pass2_solved: float | None
    arc_pass2_tasks: int | None
    arc_pass2_percent: float | None
    arc_pass2_source: str | None  # the run whose evaluation gave the pass@2 (itself or a `trm test` run)
    arc_pass2_protocol: str | None  # held-out / held-out + test-time adaptation (...) / TRM protocol
    first_alert_step: int | None
    first_alert_rule: str | None
    alerts: int
    diagnostics_step: int | None
    diagnostics: dict[str, float | None] = field(default_factory=dict)
    checkpoint_from: str | None = None  # the run whose checkpoint this one tested or resumed
    #: the held-out-rule benchmark (fewshot_eval.json): score name -> (solved, queries, mean cell accuracy)
    fewshot: dict[str, tuple[int, int, float | None]] | None = None


def measured_train_accuracy(run: Run, key: str = names.TRAIN_ACCURACY) -> Series:
    """``key`` at the logged steps where some row halted (the module writes 0 when none did)."""
    series = run.scalars.get(key, [])
    counts = dict(run.scalars.get(names.TRAIN_COUNT, []))
    return [(s, v) for s, v in series if counts.get(s, 1.0) > 0]


def _peak(series: Series) -> tuple[float, int] | tuple[None, None]:
    finite = [(v, s) for s, v in series if math.isfinite(v)]
    if not finite:
        return None, None
    best = max(v for v, _ in finite)
    return best, next(s for v, s in finite if v == best)  # the first step that reached it


def primary_stage(run: Run) -> str | None:
    """``fit`` when the run trained, else the one stage recorded (``test`` runs), else None."""
    if "fit" in run.status:
        return "fit"
    return next(iter(run.status), None)


def run_status(run: Run, now: float, stale_after_s: float) -> tuple[str, str]:
    """(status, detail) from ``status.json``, ``alerts.jsonl`` and how recently the run wrote anything."""
    record = run.status.get(primary_stage(run) or "", None)
    state = record.get("status") if record else None
    stop = next((a for a in sorted(run.alerts, key=lambda a: a["step"]) if a.get("action") in STOPPING_ACTIONS), None)
    idle = now - run.last_write
    if state in (None, "running"):
        if idle <= stale_after_s:
            return "running", f"last write {idle:.0f} s ago"
        if state is None:
            return "unknown", f"no status.json, no write for {_duration(idle)}"
        return "crashed", f"no end marker, no write for {_duration(idle)} (killed?)"
    if stop is not None:
        return "stopped by alert", f"{stop['rule']} at step {stop['step']} (action {stop['action']})"
    if state == "interrupted":
        return "interrupted", f"by {record['signal']}" if record.get("signal") else str(record.get("error", ""))
    if state == "crashed":
        return state, str(record.get("error", ""))
    if state == "finished":
        failed = [v for v in (record.get("verdicts") or {}).values() if " FAIL " in f" {v} "]
        if failed:
            return "gate failed", "; ".join(failed)
        return "finished", "stopped early by a callback" if record.get("should_stop") else ""
    return "unknown", f"status.json says {state!r}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _steps_and_wall(run: Run, now: float) -> tuple[int | None, float | None]:
    """Optimizer steps (fit runs only: a test run trains none) and seconds from start to end (or to ``now``)."""
    stage = primary_stage(run)
    record = run.status.get(stage or "", {})
    logged = max((s for series in run.scalars.values() for s, _ in series), default=None)
    steps = record.get("global_step", logged) if stage in ("fit", None) else None
    start, end = record.get("start_time"), record.get("end_time")
    if start is not None:
        return steps, (end if end is not None else now) - start
    if run.wall_times is not None:
        return steps, run.wall_times[1] - run.wall_times[0]
    return steps, None


def _pass_at_2(run: Run) -> tuple[float | None, int | None, float | None]:
    """(solved, tasks, percent) from ``eval_details.json``, else the logged percentage only."""
    entry = ((run.eval_details or {}).get("pass_at_k") or {}).get("2")
    if isinstance(entry, dict) and "solved" in entry and "tasks" in entry:
        return float(entry["solved"]), int(entry["tasks"]), float(entry.get("percent", 0.0))
    series = run.scalars.get(names.pass_at(2))
    return (None, None, series[-1][1]) if series else (None, None, None)


def checkpoint_source(run: Run, candidates: list[Run]) -> Run | None:
    """The run whose checkpoint ``run`` started from (``ckpt_path`` in its config: a ``trm test`` of it, or a
    resumed fit): the run at that exact path, else, for a relative ``ckpt_path``, the one run whose id ends the
    checkpoint's run directory."""
    ckpt = run.config.get("ckpt_path")
    if not isinstance(ckpt, str) or Path(ckpt).parent.name != CHECKPOINT_DIR:
        return None
    target = Path(ckpt).parent.parent
    others = [c for c in candidates if c is not run]
    if target.is_absolute():
        return next((c for c in others if c.path.resolve() == target.resolve()), None)
    matches = [c for c in others if target.parts[-len(Path(c.id).parts):] == Path(c.id).parts]
    return matches[0] if len(matches) == 1 else None


def fewshot_scores(run: Run) -> dict[str, tuple[int, int, float | None]] | None:
    """``fewshot_eval.json``'s scores as (solved, queries, cell accuracy); malformed entries are left out."""
    if run.fewshot is None:
        return None
    out = {}
    for name, entry in run.fewshot["scores"].items():
        if isinstance(entry, dict) and isinstance(entry.get("solved"), int) and isinstance(entry.get("n"), int):
            cell = entry.get("cell_accuracy")
            out[name] = (entry["solved"], entry["n"], float(cell) if isinstance(cell, (int, float)) else None)
    return out or None


def build_row(run: Run, baseline: Run | None, now: float, stale_after_s: float) -> Row:
    """The row of ``run``; ``changes`` is None when ``run`` is the baseline."""
    status, detail = run_status(run, now, stale_after_s)
    steps, wall = _steps_and_wall(run, now)
    train = measured_train_accuracy(run)
    peak, peak_step = _peak(train)
    val_best, val_step = _peak(run.scalars.get(names.VAL_EXACT_ACCURACY, []))
    solved, tasks, percent = _pass_at_2(run)
    alerts = sorted(run.alerts, key=lambda a: a["step"])
    diag_series = run.scalars.get(DIAGNOSTICS[0], [])
    return Row(
        run=run.id,
        stage=primary_stage(run),
        hypothesis=run.hypothesis,
        changes=None if baseline is None or baseline is run else config_diff(baseline.flat_config, run.flat_config),
        status=status,
        status_detail=detail,
        steps=steps,
        wall_s=wall,
        peak_train_accuracy=peak,
        peak_train_accuracy_step=peak_step,
        final_train_accuracy=train[-1][1] if train else None,
        best_val_exact_accuracy=val_best,
        best_val_exact_accuracy_step=val_step,
        arc_pass2_solved=solved,
        arc_pass2_tasks=tasks,
        arc_pass2_percent=percent,
        arc_pass2_source=run.id if percent is not None else None,
        arc_pass2_protocol=(run.eval_details or {}).get("protocol") if percent is not None else None,
        first_alert_step=alerts[0]["step"] if alerts else None,
        first_alert_rule=alerts[0]["rule"] if alerts else None,
        alerts=len(alerts),
        diagnostics_step=diag_series[-1][0] if diag_series else None,
        diagnostics={tag: (run.scalars[tag][-1][1] if run.scalars.get(tag) else None) for tag in DIAGNOSTICS},
        fewshot=fewshot_scores(run),
    )


def link_checkpoint_runs(rows: list[Row], runs: list[Run]) -> None:
    """For each run started from another fit run's checkpoint: note it (``checkpoint_from``), inherit that run's
    hypothesis when it has none (a saved ``config.yaml`` has no comment line), and for a ``trm test`` run give the
    fit run its pass@2 unless the fit run has its own (the last test in report order wins)."""
    row_of = {id(run): row for run, row in zip(runs, rows)}
    fits = [run for run in runs if primary_stage(run) == "fit"]
    for run, row in zip(runs, rows):
        source = checkpoint_source(run, fits)
        if source is None:
            continue
        fit_row = row_of[id(source)]
        row.checkpoint_from = fit_row.run
        if row.hypothesis is None:
            row.hypothesis = fit_row.hypothesis
        if row.stage != "fit" and row.arc_pass2_percent is not None and fit_row.arc_pass2_source != fit_row.run:
            fit_row.arc_pass2_solved, fit_row.arc_pass2_tasks = row.arc_pass2_solved, row.arc_pass2_tasks
            fit_row.arc_pass2_percent, fit_row.arc_pass2_source = row.arc_pass2_percent, row.run
            fit_row.arc_pass2_protocol = row.arc_pass2_protocol
