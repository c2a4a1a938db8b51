"""The seed's experiment table on the held-out-rule benchmark (``make sweep-fewshot``): one fit per row, scored.

    python benchmarks/sweep_fewshot.py                         # every row of configs/fewshot/sweep/: 7158 s, 2 cores
    python benchmarks/sweep_fewshot.py --rows E0_baseline E7_attention_pooling --steps 300   # a subset

Every row is ``configs/fewshot_cpu.yaml`` + one overlay of ``configs/fewshot/sweep/`` (its opening comment line is
the row's hypothesis), trained for ``--steps`` on the *same* tasks as ``make bench-fewshot`` (the same generator,
split and seed: :func:`bench_fewshot.make_tasks`). Fits run ``--jobs`` at a time (one core each). As each fit ends
it is scored exactly as the benchmark scores encoder-TRM (held-out rules with their own demos, the same queries with
another rule's context, new tasks of the training rules) and the counts go into its run directory as
``fewshot_eval.json``. The puzzle-id baseline is trained once, on the same steps. Then ``trm report`` reads the run
directories and writes ``report.md`` (with the few-shot table: counts, 95% Wilson intervals, the shuffled-context
gap, cell accuracies), ``report.csv`` and the plots into ``--report`` (default ``<out>/report``).

A row that fails (its fit exits non-zero) is reported as such and the sweep goes on; the exit status is 1 when any
row failed. Rows already scored (their ``fewshot_eval.json`` exists for the same steps and seed) are kept, not
retrained, unless ``--fresh``: a sweep that was interrupted resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _bench():
    """``benchmarks/bench_fewshot.py`` as a module (the benchmark's tasks, fit command and scores)."""
    name = "bench_fewshot"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("bench_fewshot.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()

from trm_lightning.data.fewshot_rules import FEWSHOT_FAMILIES  # noqa: E402
from trm_lightning.data.task_json import write_task_dir  # noqa: E402
from trm_lightning.run_files import FEWSHOT_EVAL_FILE  # noqa: E402

ROWS_DIR = ROOT / "configs" / "fewshot" / "sweep"
DIAGNOSTICS = ROOT / "configs" / "fewshot" / "sweep_diagnostics.yaml"  # under every row
PUZZLE_EMB_OVERLAY = ROOT / "configs" / "fewshot" / "puzzle_emb_baseline.yaml"
BASELINE_ROW = "E0_baseline"
PUZZLE_EMB_ROW = "puzzle_emb_baseline"  # TRM's per-puzzle embedding, trained once (no overlay)
VERSION = "version_0"
DEFAULT_STEPS = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=None,
                   help=f"row names (overlay file stems in {ROWS_DIR.relative_to(ROOT)}; default: all)")
    p.add_argument("--rows-dir", default=str(ROWS_DIR), help="where the row overlays are")
    p.add_argument("--config", default=str(bench.CONFIG), help="the config every row starts from")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps of every row")
    p.add_argument("--no-puzzle-emb", action="store_true", help="skip the puzzle-id baseline fit")
    p.add_argument("--no-diagnostics", action="store_true",
                   help=f"train without {DIAGNOSTICS.relative_to(ROOT)} (encoder statistics, grad norms, reliance)")
    bench.add_task_arguments(p, families_default=list(FEWSHOT_FAMILIES))  # the benchmark's tasks, same defaults
    p.add_argument("--jobs", type=int, default=2, help="fits at a time")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per fit")
    p.add_argument("--out", default=str(ROOT / "runs" / "sweep_fewshot"), help="data, runs and logs go here")
    p.add_argument("--report", default=None, help="trm report's output folder (default: <out>/report)")
    p.add_argument("--fresh", action="store_true", help="retrain rows that are already scored")
    p.add_argument("overrides", nargs="*", help="extra trm options for every fit, after --")
    args = p.parse_args(argv)
    rows_dir = Path(args.rows_dir)
    available = sorted((f.stem for f in rows_dir.glob("*.yaml")), key=_natural)
    if not available:
        p.error(f"no row overlays (*.yaml) in {rows_dir}")
    if args.rows is None:
        args.rows = available
    unknown = [r for r in args.rows if r not in available]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    if args.steps < 1 or args.jobs < 1 or args.threads < 1:
        p.error("--steps, --jobs and --threads must be >= 1")
    return args


def _natural(text: str) -> list:
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def bench_args(args: argparse.Namespace, overlay: Path | None) -> argparse.Namespace:
    """The namespace :func:`bench_fewshot.fit_command` reads, for one row (``overlay`` None: the puzzle-id fit)."""
    ns = copy.copy(args)
    ns.out = str(Path(args.out) / "runs")
    ns.encoder_config = [] if overlay is None else [str(overlay)]
    ns.fresh_tasks = overlay is not None and bench.config_fresh_tasks([args.config, str(overlay)]) is not None
    return ns


def row_configs(args: argparse.Namespace, overlay: Path | None) -> list[str]:
    """The YAMLs after ``--config``: the diagnostics (unless ``--no-diagnostics``), then the row's overlay."""
    diagnostics = [] if args.no_diagnostics else [str(DIAGNOSTICS)]
    return diagnostics + [str(overlay if overlay is not None else PUZZLE_EMB_OVERLAY)]


def scored(run_dir: Path, steps: int, seed: int) -> bool:
    """Whether ``run_dir`` already holds this sweep's scores (same steps and seed)."""
    try:
        record = json.loads((run_dir / FEWSHOT_EVAL_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record.get("steps") == steps and record.get("seed") == seed


def score_run(run_dir: Path, tasks, conditioning: str, fit_seconds: float, args: argparse.Namespace) -> dict:
    """Score one finished fit and write its ``fewshot_eval.json``; returns the scores as counts."""
    model, dm = bench.load_run(run_dir)
    held, new = bench.task_batches(tasks, dm)
    if conditioning == "encoder":
        scores = bench.evaluate_encoder(model, tasks, held, new)
    else:
        scores = bench.evaluate_baseline(model, held, new)
    bench.write_fewshot_eval(run_dir, scores, tasks, steps=args.steps, seed=args.seed, fit_seconds=fit_seconds)
    return {name: (sc.count(), sc.n) for name, sc in scores.items()}


def summary_line(name: str, counts: dict, seconds: float) -> str:
    parts = " ".join(f"{key}={k}/{n}" for key, (k, n) in counts.items())
    return f"sweep: {name}: {parts} ({seconds:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out = Path(args.out)
    runs, data, logs = out / "runs", out / "data", out / "logs"
    for folder in (runs, logs):
        folder.mkdir(parents=True, exist_ok=True)

    tasks = bench.make_tasks(args.families, args.seed, args.train_tasks, args.heldout_tasks, args.new_tasks,
                             args.heldout_fraction, args.demos, args.max_side)
    for split in ("train", "heldout"):
        for old in (data / split).glob("*.json"):
            old.unlink()
    write_task_dir(tasks.train, data / "train")
    write_task_dir(tasks.heldout, data / "heldout")

    rows_dir = Path(args.rows_dir)
    jobs: list[tuple[str, str, Path | None]] = [(row, "encoder", rows_dir / f"{row}.yaml") for row in args.rows]
    if not args.no_puzzle_emb:
        jobs.append((PUZZLE_EMB_ROW, "puzzle_emb", None))
    todo = []
    for name, conditioning, overlay in jobs:
        run_dir = runs / name / VERSION
        if not args.fresh and scored(run_dir, args.steps, args.seed):
            print(f"sweep: {name}: already scored in {run_dir} (--fresh retrains)", flush=True)
            continue
        todo.append((name, conditioning, overlay))
    print(f"sweep: {len(todo)} fit(s) of {args.steps} steps, {args.jobs} at a time; {len(tasks.train_rules)} training "
          f"rules, {len(tasks.heldout_rules)} held-out rules, {len(tasks.heldout)} held-out and {len(tasks.new)} new "
          f"tasks; runs in {runs}", flush=True)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    running: dict[str, tuple[subprocess.Popen, float, str, Path]] = {}
    failed: list[str] = []
    done = 0
    while todo or running:
        while todo and len(running) < args.jobs:
            name, conditioning, overlay = todo.pop(0)
            run_dir = runs / name / VERSION
            shutil.rmtree(run_dir, ignore_errors=True)  # a half-written run of an interrupted sweep
            command = bench.fit_command(bench_args(args, overlay), data, conditioning, args.steps, name=name,
                                        version=VERSION, extra=row_configs(args, overlay))
            log = logs / f"{name}.log"
            with log.open("w") as handle:
                proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            running[name] = (proc, time.perf_counter(), conditioning, log)
            print(f"sweep: {name}: training (log {log})", flush=True)
        for name, (proc, started, conditioning, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            seconds = time.perf_counter() - started
            done += 1
            if proc.returncode != 0:
                failed.append(name)
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                print(f"sweep: {name}: FIT FAILED (exit {proc.returncode}), log {log}:\n{tail}", flush=True)
                continue
            counts = score_run(runs / name / VERSION, tasks, conditioning, seconds, args)
            print(summary_line(name, counts, seconds), flush=True)
        time.sleep(0.5)

    from trm_lightning.report.command import build_report

    report_dir = Path(args.report) if args.report else out / "report"
    report = build_report(runs, baseline=f"{BASELINE_ROW}/{VERSION}" if BASELINE_ROW in args.rows else None,
                          out=report_dir)
    print(f"sweep: {done} fit(s) in {time.perf_counter() - wall:.0f} s; report of {len(report.rows)} run(s): "
          f"{report.markdown_path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
