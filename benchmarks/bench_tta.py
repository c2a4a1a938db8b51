"""Test-time adaptation on the held-out-rule benchmark: how many more held-out queries does each method solve?

    python benchmarks/bench_fewshot.py --models encoder --out runs/fewshot      # train (or reuse) encoder-TRM
    python benchmarks/bench_tta.py --run runs/fewshot                           # `make bench-tta`

It loads the encoder-TRM that ``bench_fewshot.py`` trained (``<run>/encoder/bench/checkpoints/last.ckpt``) and its
held-out tasks (the run's ``data.eval_source``), scores every held-out query without adaptation (the benchmark's
``heldout`` number), then, task by task, adapts with each method of :mod:`trm_lightning.adaptation` on the task's
own demo pairs only (leave-one-out, original version) and scores the task's queries with the adapted context
(``context``) or weights (``finetune``), which are reset before the next task. One line per method:

    bench tta method=<m> steps=<k> tasks=<n> s_per_task=<x> heldout_before=<a>/<q> heldout_after=<b>/<q> ...

with both counts' 95% Wilson intervals and the paired gain ``b - a`` with a 95% bootstrap interval over tasks (the
queries of one task are not independent). ``s_per_task`` is the adaptation's wall time per task (scoring
excluded). ``--trm-protocol-run DIR`` adds the comparison with TRM's protocol: a puzzle-id run trained with
``data.train_on_eval_demos: true`` on the same tasks (``--train-trm-protocol`` trains it: the baseline fit of
``bench_fewshot.py`` plus that flag) scored on the same queries with the held-out tasks' own trained ids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_tta.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_fewshot import CONFIG, RUN_VERSION, load_run, score  # noqa: E402
from trm_lightning.adaptation import METHODS, PARAMETER_SETS, AdaptationConfig, Finetuner, adapt_context_group  # noqa: E402
from trm_lightning.stats import wilson_interval  # noqa: E402
from trm_lightning.run_files import CHECKPOINT_DIR, LAST_CHECKPOINT  # noqa: E402

TRM_PROTOCOL = "puzzle_emb_trm_protocol"  # the run name of the TRM-protocol baseline under --run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "fewshot"), help="bench_fewshot.py's --out directory")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                   help="adaptation methods to measure (none: only the unadapted score and the TRM-protocol line)")
    p.add_argument("--context-steps", type=int, default=32)
    p.add_argument("--context-lr", type=float, default=1e-2)
    p.add_argument("--finetune-steps", type=int, default=32)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-params", default="all", choices=PARAMETER_SETS)
    p.add_argument("--time-budget", type=float, default=None, help="seconds per task and method (default: none)")
    p.add_argument("--task-batch", type=int, default=AdaptationConfig.task_batch,
                   help="context: tasks adapted together in one batch (default: %(default)s; 1: one at a time)")
    p.add_argument("--tasks", type=int, default=None, help="the first N held-out tasks only (default: all)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--trm-protocol-run", default=None,
                   help="a puzzle-id run trained with data.train_on_eval_demos=true on the same tasks "
                        f"(default: <run>/{TRM_PROTOCOL}/{RUN_VERSION} if it exists)")
    p.add_argument("--train-trm-protocol", action="store_true",
                   help="train that run first (the baseline fit of bench_fewshot.py with TRM's protocol)")
    p.add_argument("--trm-protocol-steps", type=int, default=None, help="its training steps (default: the config's)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the gain's interval")
    p.add_argument("--record", default=None, help="append the numbers as JSON lines to this file")
    p.add_argument("overrides", nargs="*", help="extra trm options for the TRM-protocol fit, after --")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Gain:
    """Paired comparison on the same queries: solved before and after, per task."""

    before: np.ndarray  # (tasks,) queries solved per task
    after: np.ndarray
    queries: int

    def ci(self, resamples: int, seed: int = 0) -> tuple[float, float]:
        """95% percentile-bootstrap interval of ``sum(after - before)`` (queries), tasks resampled."""
        diff = self.after - self.before
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, diff.size, size=(resamples, diff.size))
        sums = diff[picks].sum(axis=1)
        return float(np.percentile(sums, 2.5)), float(np.percentile(sums, 97.5))


def wilson(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"[{100 * lo:.1f}%,{100 * hi:.1f}%]"


def per_task(exact: torch.Tensor, task_of_row: torch.Tensor, tasks: int) -> np.ndarray:
    return np.bincount(task_of_row.numpy(), weights=exact.numpy().astype(float), minlength=tasks).astype(int)


def rows_of(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def adapt_and_score(module, dm, batch, tasks: list[int], method: str, config: AdaptationConfig) -> tuple[torch.Tensor, float, int]:
    """Each task adapted on its demos alone (original version), its queries scored, the adaptation undone: (exact
    per row, adaptation seconds, steps taken in all). ``context`` adapts ``config.task_batch`` tasks per batch."""
    net = module.model
    exact = torch.zeros(batch["inputs"].shape[0], dtype=torch.bool)
    tuner = Finetuner(net, config) if method == "finetune" else None
    group_size = config.task_batch if tuner is None else 1
    adapt_s, steps, done = 0.0, 0, 0
    for first in range(0, len(tasks), group_size):
        group = tasks[first : first + group_size]
        rows = [(batch["task_index"] == t).nonzero().flatten() for t in group]
        demos = [dm.task_demos(t, [0]) for t in group]
        start = time.perf_counter()
        if tuner is None:
            results = adapt_context_group(net, demos, config)
            adapt_s += time.perf_counter() - start
            for r, (context, taken) in zip(rows, results):
                exact[r] = score(module, rows_of(batch, r), context[0].expand(len(r), -1, -1)).exact
                steps += taken
        else:
            with tuner.adapted(demos[0]) as taken:
                adapt_s += time.perf_counter() - start
                exact[rows[0]] = score(module, rows_of(batch, rows[0])).exact
            steps += taken
        before, done = done, done + len(group)
        if done // 10 > before // 10 or done == len(tasks):
            print(f"\rbench tta: {method} {done}/{len(tasks)} tasks, {adapt_s / done:.2f} s/task",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return exact, adapt_s, steps


def train_trm_protocol(run: Path, steps: int | None, overrides: list[str] = ()) -> Path:
    """The puzzle-id baseline with ``data.train_on_eval_demos: true`` on the run's tasks (``trm fit``)."""
    data = run / "data"
    log = run / f"{TRM_PROTOCOL}_fit.log"
    cmd = [sys.executable, "-m", "trm_lightning", "fit", "--config", str(CONFIG),
           f"--data.train_source={data / 'train'}", f"--data.eval_source={data / 'heldout'}",
           "--data.fresh_tasks=null", "--data.train_on_eval_demos=true",
           f"--trainer.logger.init_args.save_dir={run}", f"--trainer.logger.init_args.name={TRM_PROTOCOL}",
           f"--trainer.logger.init_args.version={RUN_VERSION}",
           *([] if steps is None else [f"--trainer.max_steps={steps}"]),
           *overrides,
           "--model.conditioner=PuzzleEmbedding"]
    target = run / TRM_PROTOCOL / RUN_VERSION
    if target.exists():
        import shutil

        shutil.rmtree(target)
    print(f"bench tta: training the TRM-protocol baseline (log: {log})", flush=True)
    with log.open("w") as handle:
        code = subprocess.call(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if code != 0:
        sys.exit(f"bench tta: the TRM-protocol fit failed (exit {code}); log: {log}")
    return target


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run_dir = run / "encoder" / RUN_VERSION
    if not (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        sys.exit(f"bench tta: no trained encoder-TRM under {run_dir}: run "
                 f"`python benchmarks/bench_fewshot.py --models encoder --out {run}` first")
    module, dm = load_run(run_dir)
    n_tasks = len(dm.eval_tasks) if args.tasks is None else min(args.tasks, len(dm.eval_tasks))
    tasks = list(range(n_tasks))
    batch = dm.queries("eval", [0], task_indices=tasks).batch()
    task_of_row = batch["task_index"]
    queries = int(task_of_row.numel())
    before = score(module, batch).exact
    before_tasks = per_task(before, task_of_row, n_tasks)
    a = int(before.sum())
    print(f"bench tta: {run_dir}: {n_tasks} held-out tasks, {queries} queries; no adaptation {a}/{queries} "
          f"{wilson(a, queries)}", flush=True)

    lines, records = [], []
    for method in args.methods:
        config = AdaptationConfig(methods=[method], context_steps=args.context_steps, context_lr=args.context_lr,
                                  finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                                  finetune_params=args.finetune_params, time_budget_s=args.time_budget,
                                  task_batch=args.task_batch)
        exact, seconds, taken = adapt_and_score(module, dm, batch, tasks, method, config)
        b = int(exact.sum())
        gain = Gain(before_tasks, per_task(exact, task_of_row, n_tasks), queries)
        lo, hi = gain.ci(args.bootstrap)
        steps = config.steps(method)
        what = f"{method}({config.finetune_params})" if method == "finetune" else method
        batched = f" task_batch={config.task_batch}" if method == "context" else ""
        line = (f"bench tta method={what} steps={steps} tasks={n_tasks} s_per_task={seconds / n_tasks:.3f} "
                f"heldout_before={a}/{queries} heldout_after={b}/{queries} before_ci={wilson(a, queries)} "
                f"after_ci={wilson(b, queries)} gain={b - a:+d} gain_ci=[{lo:+.0f},{hi:+.0f}] "
                f"gain_outside_ci={'yes' if lo > 0 else 'no'} steps_taken={taken / n_tasks:.1f}{batched}")
        print(line, flush=True)
        lines.append(line)
        records.append({"method": what, "steps": steps, "lr": config.context_lr if method == "context"
                        else config.finetune_lr, "tasks": n_tasks, "queries": queries,
                        "s_per_task": seconds / n_tasks, "before": a, "after": b, "gain_ci": [lo, hi]})

    trm_run = Path(args.trm_protocol_run) if args.trm_protocol_run else run / TRM_PROTOCOL / RUN_VERSION
    if args.train_trm_protocol:
        trm_run = train_trm_protocol(run, args.trm_protocol_steps, args.overrides)
    if (trm_run / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        baseline, bdm = load_run(trm_run)
        if not bdm.train_on_eval_demos:
            sys.exit(f"bench tta: {trm_run} was not trained with data.train_on_eval_demos=true")
        bbatch = bdm.queries("eval", [0], task_indices=tasks).batch()
        if not bool((bbatch["puzzle_id"] > 0).all()):
            raise RuntimeError("TRM protocol: every held-out query should carry its task's trained id")
        c = int(score(baseline, bbatch).exact.sum())
        line = (f"bench tta method=trm_protocol_puzzle_emb tasks={n_tasks} heldout={c}/{queries} "
                f"ci={wilson(c, queries)} (puzzle ids trained on the held-out tasks' demo pairs)")
        print(line, flush=True)
        lines.append(line)
        records.append({"method": "trm_protocol_puzzle_emb", "tasks": n_tasks, "queries": queries, "after": c})

    if args.record:
        with open(args.record, "a") as handle:
            for rec in records:
                handle.write(json.dumps({"run": str(run_dir), **rec}) + "\n")
    return lines


if __name__ == "__main__":
    main()
