"""The rows as ``report.md`` (the seed's tracking table: ID, Hypothesis, Change, Status, Result, Notes, then the
numbers and the end-of-run diagnostics) and ``report.csv`` (every field, one column each)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from trm_lightning.report.runs import Skipped
from trm_lightning.report.summary import DIAGNOSTICS, Row
from trm_lightning.stats import format_count

STATUS_MARK = {"finished": "✅", "stopped by alert": "🛑", "gate failed": "⛔", "crashed": "❌", "interrupted": "⏸️",
               "running": "⏳", "unknown": "❔"}
MAX_CHANGES_MD = 6  # the rest is in report.csv

CSV_COLUMNS = (
    "run", "stage", "hypothesis", "change", "status", "status_detail", "steps", "wall_s",
    "peak_train_accuracy", "peak_train_accuracy_step", "final_train_accuracy",
    "best_val_exact_accuracy", "best_val_exact_accuracy_step",
    "arc_pass2_solved", "arc_pass2_tasks", "arc_pass2_percent", "arc_pass2_source", "arc_pass2_protocol",
    "first_alert_step", "first_alert_rule", "alerts", "checkpoint_from", "diagnostics_step", *DIAGNOSTICS,
    *(f"fewshot_{part}_{field}" for part in ("heldout", "shuffled_context", "train") for field in ("solved", "n", "cell")),
)

#: the few-shot table's parts -> the score names that fill them (an encoder run's, else the puzzle-id model's)
FEWSHOT_PARTS = {"heldout": ("heldout", "puzzle_emb_baseline"), "shuffled_context": ("shuffled_context",),
                 "train": ("train", "baseline_new")}


def fewshot_part(row: Row, part: str) -> tuple[int, int, float | None] | None:
    """(solved, queries, cell accuracy) of one part of the few-shot table, None when the run has no such score."""
    scores = row.fewshot or {}
    return next((scores[name] for name in FEWSHOT_PARTS[part] if name in scores), None)


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _count(value: float | None) -> str:
    return "" if value is None else (str(int(value)) if float(value).is_integer() else f"{value:.1f}")


def change_text(row: Row, limit: int | None = None) -> str:
    """``baseline`` for the baseline, ``none``, or ``key: before → after; ...`` (at most ``limit`` changes)."""
    if row.changes is None:
        return "baseline"
    if not row.changes:
        return "none"
    shown = row.changes if limit is None else row.changes[:limit]
    text = "; ".join(str(c) for c in shown)
    if len(shown) < len(row.changes):
        text += f"; … (+{len(row.changes) - len(shown)} more in report.csv)"
    return text


def pass2_text(row: Row) -> str:
    """``3/400`` (counts) or ``0.75%`` (only the logged percentage), empty without an evaluation."""
    if row.arc_pass2_tasks is not None:
        protocol = f" ({row.arc_pass2_protocol})" if row.arc_pass2_protocol else ""
        return f"{_count(row.arc_pass2_solved)}/{row.arc_pass2_tasks}{protocol}"
    return "" if row.arc_pass2_percent is None else f"{row.arc_pass2_percent:.2f}%"


def result_text(row: Row) -> str:
    """The Result cell: accuracy peak and end, best held-out exact accuracy, pass@2."""
    parts = []
    if row.peak_train_accuracy is not None:
        parts.append(f"train acc peak {row.peak_train_accuracy:.3f} @ {row.peak_train_accuracy_step}, "
                     f"final {row.final_train_accuracy:.3f}")
    if row.best_val_exact_accuracy is not None:
        parts.append(f"val exact best {row.best_val_exact_accuracy:.3f} @ {row.best_val_exact_accuracy_step}")
    held = fewshot_part(row, "heldout")
    if held is not None:
        parts.append(f"held-out rules {held[0]}/{held[1]}")
    if pass2_text(row):
        source = "" if row.arc_pass2_source == row.run else f" ({row.arc_pass2_source})"
        parts.append(f"pass@2 {pass2_text(row)}{source}")
    return "; ".join(parts) or "-"


def status_text(row: Row) -> str:
    text = f"{STATUS_MARK.get(row.status, '')} {row.status}".strip()
    return f"{text}: {row.status_detail}" if row.status_detail else text


def notes_text(row: Row) -> str:
    parts = []
    if row.first_alert_step is not None:
        parts.append(f"first alert {row.first_alert_rule} @ {row.first_alert_step} ({row.alerts} in all)")
    if row.steps is not None:
        wall = "" if row.wall_s is None else f" in {row.wall_s:.0f} s" if row.wall_s >= 10 else f" in {row.wall_s:.1f} s"
        parts.append(f"{row.steps} steps{wall}")
    if row.stage not in (None, "fit"):
        parts.append(f"{row.stage} run" + (f" of {row.checkpoint_from}" if row.checkpoint_from else ""))
    elif row.checkpoint_from:
        parts.append(f"resumed from {row.checkpoint_from}")
    return "; ".join(parts) or "-"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def markdown(rows: Sequence[Row], skipped: Sequence[Skipped], baseline: str | None, plots: Sequence[Path],
             runs_dir: str) -> str:
    """The whole ``report.md``."""
    lines = [f"# Experiment report: `{runs_dir}`", ""]
    lines += [f"{len(rows)} run(s); baseline for the Change column: `{baseline or '-'}`. Steps are optimizer steps. "
              "Hypotheses come from each run's experiment.json (the opening comment line of its experiment overlay).", ""]
    lines += _table(["ID", "Hypothesis", "Change", "Status", "Result", "Notes"], [
        (r.run, r.hypothesis or "-", change_text(r, MAX_CHANGES_MD), status_text(r), result_text(r), notes_text(r))
        for r in rows])
    lines += ["", "## Numbers", ""]
    lines += _table(
        ["ID", "status", "steps", "wall s", "peak train acc", "@ step", "final train acc", "best val exact",
         "ARC pass@2", "first alert", "alerts"],
        [(r.run, r.status, r.steps if r.steps is not None else "", _num(r.wall_s), _num(r.peak_train_accuracy),
          r.peak_train_accuracy_step if r.peak_train_accuracy_step is not None else "", _num(r.final_train_accuracy),
          _num(r.best_val_exact_accuracy), pass2_text(r),
          f"{r.first_alert_rule} @ {r.first_alert_step}" if r.first_alert_step is not None else "", r.alerts)
         for r in rows])
    lines += ["", "## Encoder diagnostics at the end", ""]
    lines += _table(["ID", "step", *(d.split("/", 1)[1] for d in DIAGNOSTICS)],
                    [(r.run, r.diagnostics_step if r.diagnostics_step is not None else "",
                      *(_num(r.diagnostics.get(d)) for d in DIAGNOSTICS)) for r in rows if r.diagnostics_step is not None])
    lines += fewshot_table(rows)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{s.path}`: {s.reason}" for s in skipped]
    return "\n".join(lines) + "\n"


def fewshot_table(rows: Sequence[Row]) -> list[str]:
    """The held-out-rule benchmark's section (empty when no run has ``fewshot_eval.json``): exact counts with their
    95% Wilson intervals, the shuffled-context gap in points, and the mean cell accuracies."""
    scored = [r for r in rows if r.fewshot]
    if not scored:
        return []

    def count(part):
        return "" if part is None else format_count(part[0], part[1])

    def cell(part):
        return "" if part is None or part[2] is None else f"{part[2]:.3f}"

    table = []
    for r in scored:
        held, shuffled, new = (fewshot_part(r, p) for p in FEWSHOT_PARTS)
        gap = (f"{100.0 * (held[0] / held[1] - shuffled[0] / shuffled[1]):+.1f}"
               if held and shuffled and held[1] and shuffled[1] else "")
        table.append((r.run, count(held), count(shuffled), gap, cell(held), cell(shuffled), count(new), cell(new)))
    lines = ["", "## Few-shot benchmark: held-out rules", "",
             "Exact answers (every cell and the border right), 95% Wilson intervals. *shuffled*: the same held-out "
             "queries given another rule's context; *gap*: held-out minus shuffled, in points. *train rules*: new "
             "tasks of the training rules. A puzzle-id run shows its blank-id score on the held-out queries.", ""]
    return lines + _table(["ID", "held-out exact", "shuffled context", "gap (pt)", "held-out cell acc",
                           "shuffled cell acc", "train rules exact", "train rules cell acc"], table)


def csv_record(row: Row) -> dict[str, object]:
    """One CSV line: every field, the full change list, empty cells for missing values."""
    record: dict[str, object] = {
        "run": row.run, "stage": row.stage, "hypothesis": row.hypothesis, "change": change_text(row),
        "status": row.status, "status_detail": row.status_detail, "steps": row.steps, "wall_s": row.wall_s,
        "peak_train_accuracy": row.peak_train_accuracy, "peak_train_accuracy_step": row.peak_train_accuracy_step,
        "final_train_accuracy": row.final_train_accuracy, "best_val_exact_accuracy": row.best_val_exact_accuracy,
        "best_val_exact_accuracy_step": row.best_val_exact_accuracy_step, "arc_pass2_solved": row.arc_pass2_solved,
        "arc_pass2_tasks": row.arc_pass2_tasks, "arc_pass2_percent": row.arc_pass2_percent,
        "arc_pass2_source": row.arc_pass2_source, "arc_pass2_protocol": row.arc_pass2_protocol,
        "first_alert_step": row.first_alert_step,
        "first_alert_rule": row.first_alert_rule, "alerts": row.alerts, "checkpoint_from": row.checkpoint_from,
        "diagnostics_step": row.diagnostics_step,
        **row.diagnostics,
    }
    for part in FEWSHOT_PARTS:
        values = fewshot_part(row, part)
        for field, value in zip(("solved", "n", "cell"), values or (None, None, None)):
            record[f"fewshot_{part}_{field}"] = value
    return {k: ("" if record.get(k) is None else record[k]) for k in CSV_COLUMNS}


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_record(r) for r in rows)
