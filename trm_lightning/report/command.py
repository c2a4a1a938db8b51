"""``trm report RUNS_DIR [--baseline RUN] [--out DIR]``: the tracking table and plots from the runs' own files."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from trm_lightning.errors import ConfigError
from trm_lightning.report.runs import Run, Skipped, load_runs
from trm_lightning.report.summary import Row, link_checkpoint_runs, build_row
from trm_lightning.report.tables import markdown, write_csv
from trm_lightning.run_files import REPORT_CSV, REPORT_DIR, REPORT_MARKDOWN

DEFAULT_STALE_AFTER_S = 1800.0


@dataclass
class Report:
    """What :func:`build_report` produced."""

    rows: list[Row]
    runs: list[Run]
    skipped: list[Skipped]
    baseline: str | None
    out_dir: Path
    markdown_path: Path
    csv_path: Path
    plots: list[Path]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trm report",
        description="Scan RUNS_DIR for run directories (<name>/version_<n>, as `trm fit` writes them) and write "
        "report.md (the seed's tracking table: ID, hypothesis, change, status, result, notes; then the numbers and "
        "the encoder diagnostics at the end), report.csv and PNG plots overlaying the runs. Anything that is not a "
        "readable run is skipped with a one-line reason.",
    )
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="folder holding the runs, e.g. runs")
    p.add_argument("--baseline", metavar="RUN", default=None,
                   help="the run the Change column compares against: its id (E0_baseline/version_0), its name when it "
                   "has one version, or its path (default: the first run in natural order)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUNS_DIR/report)")
    p.add_argument("--stale-after", metavar="SECONDS", type=float, default=DEFAULT_STALE_AFTER_S,
                   help="a run without an end marker counts as running while it wrote something in the last SECONDS, "
                   "as crashed after (default: %(default)g)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    return p


def pick_baseline(runs: list[Run], wanted: str | None, runs_dir: Path) -> Run | None:
    """The ``--baseline`` run (id, unique name or path), or the first run; ConfigError when it is not found."""
    if not runs:
        if wanted:
            raise ConfigError(f"report: --baseline {wanted}: no runs found under {runs_dir}")
        return None
    if wanted is None:
        return runs[0]
    text = wanted.rstrip("/")
    for run in runs:
        if run.id == text:
            return run
    path = Path(text)
    for candidate in (path, runs_dir / path):
        if candidate.is_dir():
            found = [r for r in runs if r.path.resolve() == candidate.resolve()]
            if found:
                return found[0]
    named = [r for r in runs if r.id.split("/")[0] == text]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ConfigError(f"report: --baseline {wanted} has {len(named)} versions; name one of "
                          + ", ".join(r.id for r in named))
    raise ConfigError(f"report: --baseline {wanted} is not among the runs under {runs_dir}: "
                      + ", ".join(r.id for r in runs))


def build_report(runs_dir: str | Path, baseline: str | None = None, out: str | Path | None = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, now: float | None = None, plots: bool = True) -> Report:
    """Read every run under ``runs_dir`` and write report.md, report.csv and (``plots``) the PNGs into ``out``
    (default ``runs_dir/report``, never scanned as a run). ``now`` (unix seconds) is for tests."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ConfigError(f"report: {runs_dir} is not a directory")
    out_dir = Path(out) if out is not None else runs_dir / REPORT_DIR
    runs, skipped = load_runs(runs_dir, exclude=(out_dir,))
    base = pick_baseline(runs, baseline, runs_dir)
    now = time.time() if now is None else now
    rows = [build_row(run, base, now, stale_after_s) for run in runs]
    link_checkpoint_runs(rows, runs)

    out_dir.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    if plots and runs:
        from trm_lightning.report.plots import write_plots  # matplotlib only when plots are made

        pngs = write_plots(runs, out_dir)
    md_path, csv_path = out_dir / REPORT_MARKDOWN, out_dir / REPORT_CSV
    md_path.write_text(markdown(rows, skipped, base.id if base else None, pngs, str(runs_dir)))
    write_csv(rows, csv_path)
    return Report(rows, runs, skipped, base.id if base else None, out_dir, md_path, csv_path, pngs)


def main(argv: list[str] | None = None) -> Report:
    """Parse ``argv`` (without ``report``), build the report, print one line per skipped entry and a summary."""
    args = parser().parse_args(argv)
    report = build_report(args.runs_dir, args.baseline, args.out, args.stale_after, plots=not args.no_plots)
    for item in report.skipped:
        print(item, flush=True)
    print(f"report: {len(report.rows)} run(s), {len(report.skipped)} skipped, baseline {report.baseline or '-'}; "
          f"wrote {report.markdown_path}, {report.csv_path.name} and {len(report.plots)} plot(s)", flush=True)
    return report
