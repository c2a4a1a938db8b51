"""Held-out-rule benchmark (few-shot): can encoder-TRM solve a rule it never trained on by reading its demos?

    python benchmarks/bench_fewshot.py                 # `make bench-fewshot`: the whole thing on the CPU
    python benchmarks/bench_fewshot.py --steps 20 --baseline-steps 20 --train-tasks 64   # a smoke run

1. Tasks (``trm_lightning/data/fewshot_rules.py``, :func:`make_fewshot_split`): every rule is ``family(s, c)``, a
   structural operation ``s`` (dihedral transform, gravity side, ray direction, fill mode, size rank, tiling
   mode, source colour) drawing in colour ``c``. The split holds out (s, c) combinations: a held-out rule never
   occurs in training, but its parts do, and within a family all tasks draw inputs from one distribution, so
   a held-out query is ambiguous without its demos. The task directories are written under ``--out``.
2. Two short trainings through the real CLI (``configs/fewshot_cpu.yaml``): encoder-TRM
   (``model.conditioner=StandardDemoEncoder``) and TRM's puzzle-id baseline (``model.conditioner=PuzzleEmbedding``), same
   model, data, steps and seed.
3. The held-out queries (original version, augmentation 0), one rollout each (``model.rollout``, exactly
   ``halt_max_steps`` ACT steps), counted as exact matches (every cell and the EOS border right), three ways:

   - ``heldout``: encoder-TRM with the context of the query's own demos;
   - ``shuffled_context``: the same model, each row given the context of a row of *another rule* (a fixed
     derangement over rules, as ``callbacks.ContextReliance`` does over tasks). The gap to ``heldout`` is the
     evidence that the answers come from reading the demos;
   - ``puzzle_emb_baseline``: the puzzle-id model. A held-out task was never trained, so its rows carry the
     blank id (an all-zero prefix): it cannot know which rule applies and shows what the input alone gives.

   ``data.train_on_eval_demos`` stays off: with it (TRM's protocol) both models would train on the held-out
   tasks' demo pairs, the puzzle-id table would learn a vector per held-out task, and the number would measure
   test-time training on those tasks, not few-shot generalisation to an unseen rule. Augmentation is off as
   well (``data.num_train_augmentations: 1``): a colour permutation or dihedral transform of a task is another
   rule of the family, possibly a held-out one.

The last line is ``fewshot: heldout=<a>/<n> shuffled_context=<b>/<n> puzzle_emb_baseline=<c>/<n>``. Above it:
per-family counts, and each model's exact accuracy on (a sample of) its own training queries as a check that
training worked at all. Extra ``trm`` options go after ``--``, e.g. ``-- --model.hidden_size=96``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_fewshot.py` from anywhere
    sys.path.insert(0, str(ROOT))

from callbacks.context_reliance import derangement  # noqa: E402
from trm_lightning.losses import row_accuracy  # noqa: E402
from trm_lightning.run_files import LAST_CHECKPOINT, checkpoint_dir  # noqa: E402
from trm_lightning.data.datamodule import ARCDataModule  # noqa: E402
from trm_lightning.data.fewshot_rules import FEWSHOT_FAMILIES, make_fewshot_split, rule_of, split_rules  # noqa: E402
from trm_lightning.data.task_json import write_task_dir  # noqa: E402
from trm_lightning.module import TRMLitModule  # noqa: E402

CONFIG = ROOT / "configs" / "fewshot_cpu.yaml"
CONDITIONERS = {"encoder": "StandardDemoEncoder", "puzzle_emb": "PuzzleEmbedding"}  # run label -> model.conditioner
RUN_VERSION = "bench"  # runs land in <out>/<conditioning>/bench/ (replaced by the next run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="encoder-TRM training steps (default: the config's)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="puzzle-id baseline training steps (default: the same as --steps)")
    p.add_argument("--train-tasks", type=int, default=4000, help="training tasks (over the training rules)")
    p.add_argument("--heldout-tasks", type=int, default=138, help="held-out tasks (over the held-out rules)")
    p.add_argument("--heldout-fraction", type=float, default=0.25, help="share of each family's rules held out")
    p.add_argument("--families", nargs="+", default=list(FEWSHOT_FAMILIES), choices=FEWSHOT_FAMILIES)
    p.add_argument("--demos", type=int, default=3, help="demo pairs per task")
    p.add_argument("--max-side", type=int, default=6, help="largest grid side (the canvas is the config's)")
    p.add_argument("--seed", type=int, default=0, help="task generation and training seed")
    p.add_argument("--train-eval-queries", type=int, default=128,
                   help="training queries re-evaluated as a check that training worked (0: none)")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="fits at a time: 2 trains both models concurrently (one core each on a 2-core CPU)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per fit (OMP_NUM_THREADS)")
    p.add_argument("--out", default=str(ROOT / "runs" / "fewshot"), help="task directories and run logs go here")
    p.add_argument("overrides", nargs="*", help="extra trm options for both fits, after --")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- training
def fit_command(args: argparse.Namespace, data: Path, conditioning: str, steps: int | None) -> list[str]:
    """``python -m trm_lightning fit ...`` (the ``trm fit`` CLI) for one of the two models."""
    return [
        sys.executable, "-m", "trm_lightning", "fit",
        "--config", str(CONFIG),
        f"--data.train_source={data / 'train'}",
        f"--data.eval_source={data / 'heldout'}",
        f"--seed_everything={args.seed}",
        f"--trainer.logger.init_args.save_dir={args.out}",
        f"--trainer.logger.init_args.name={conditioning}",
        f"--trainer.logger.init_args.version={RUN_VERSION}",
        *([] if steps is None else [f"--trainer.max_steps={steps}"]),
        *args.overrides,
        # last: choosing another conditioner class drops the encoder knobs the overrides may set
        f"--model.conditioner={CONDITIONERS[conditioning]}",
    ]


def run_fits(args: argparse.Namespace, data: Path) -> dict[str, tuple[Path, float]]:
    """Train both models (concurrently with ``--jobs 2``, each on ``--threads`` threads); returns, per
    conditioning, its run directory and the fit's wall seconds. A failed fit prints its log's tail and exits 1."""
    out = Path(args.out)
    steps = {"encoder": args.steps, "puzzle_emb": args.baseline_steps if args.baseline_steps is not None else args.steps}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    pending = list(steps)
    running: dict[str, tuple[subprocess.Popen, float, Path, Path]] = {}
    done: dict[str, tuple[Path, float]] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            run_dir = out / name / RUN_VERSION
            shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier run of the same name
            log = out / f"{name}_fit.log"  # beside the run directory: `trm fit` refuses a non-empty one
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"fewshot: training {name} (log: {log})", flush=True)
            with log.open("w") as handle:
                proc = subprocess.Popen(fit_command(args, data, name, steps[name]), cwd=ROOT, env=env,
                                        stdout=handle, stderr=subprocess.STDOUT)
            running[name] = (proc, time.perf_counter(), run_dir, log)
        for name, (proc, started, run_dir, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            lines = log.read_text(errors="replace").splitlines()
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.kill()
                print("\n".join(lines[-40:]), file=sys.stderr)
                sys.exit(f"fewshot: the {name} fit failed (exit {proc.returncode}); log: {log}")
            done[name] = (run_dir, time.perf_counter() - started)
            print(next((line for line in reversed(lines) if line.startswith("fewshot-fit:")), f"{name}: done"),
                  flush=True)
        time.sleep(0.2)
    return done


def load_run(run_dir: Path) -> tuple[TRMLitModule, ARCDataModule]:
    """The trained module (``checkpoints/last.ckpt``) and its datamodule, rebuilt from the checkpoint's
    hyperparameters and set up (the same tasks in the same order as in training)."""
    path = Path(checkpoint_dir(run_dir)) / LAST_CHECKPOINT
    model = TRMLitModule.load_from_checkpoint(path, map_location="cpu")
    dm = ARCDataModule.load_from_checkpoint(path)
    dm.setup()
    return model.eval(), dm


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score(model, batch: dict[str, torch.Tensor], context: torch.Tensor | None = None, chunk: int = 64) -> Score:
    """One evaluation rollout per row, in chunks of ``chunk`` rows; ``context`` (N, P, D), when given, replaces
    the rows' own context."""
    model.eval()
    exact, cells = [], []
    for start in range(0, batch["inputs"].shape[0], chunk):
        part = {k: v[start : start + chunk] for k, v in batch.items()}
        own = None if context is None else context[start : start + chunk]
        logits = model.model.rollout(part, context=own).logits
        has, hit, cell = row_accuracy(logits.argmax(-1), part["labels"])
        if not bool(has.all()):
            raise RuntimeError("an evaluation query without a known output")
        exact.append(hit)
        cells.append(cell)
    return Score(torch.cat(exact), torch.cat(cells))


def shuffled_context(model, batch: dict[str, torch.Tensor], rule_ids: torch.Tensor, chunk: int = 64) -> Score:
    """The score with each row given the context of a row of another rule: one derangement over the whole batch,
    grouped by rule (:func:`callbacks.context_reliance.derangement`)."""
    perm = derangement(rule_ids)
    if perm is None:
        raise RuntimeError("the shuffled-context control needs at least two held-out queries")
    if bool((rule_ids[perm] == rule_ids).any()):
        raise RuntimeError("a held-out rule holds more than half the queries: its rows cannot all be shuffled")
    model.eval()
    rows = batch["inputs"].shape[0]
    with torch.no_grad():
        own = torch.cat([model.model.encode({k: v[i : i + chunk] for k, v in batch.items()})
                         for i in range(0, rows, chunk)])
    return score(model, batch, own[perm], chunk)


@dataclass(frozen=True)
class Score:
    """Per query: ``exact`` (N,) bool, every supervised cell right; ``cell`` (N,) the fraction of them right."""

    exact: torch.Tensor
    cell: torch.Tensor

    def count(self, rows: torch.Tensor | None = None) -> int:
        return int(self.exact.sum() if rows is None else self.exact[rows].sum())


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.1f}%)" if n else f"{k}/0"


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out = Path(args.out)
    data = out / "data"

    # ---- tasks
    train_rules, heldout_rules = split_rules(args.families, args.heldout_fraction, args.seed)
    train, heldout = make_fewshot_split(
        args.train_tasks, args.heldout_tasks, args.seed, families=args.families,
        heldout_fraction=args.heldout_fraction, n_demos=args.demos, max_side=args.max_side,
    )
    for split in ("train", "heldout"):  # stale files of an earlier run would be read as tasks
        for old in (data / split).glob("*.json"):
            old.unlink()
    write_task_dir(train, data / "train")
    write_task_dir(heldout, data / "heldout")
    print(f"fewshot: {len(train_rules)} training rules, {len(heldout_rules)} held-out rules over "
          f"{len(args.families)} families; {len(train)} training tasks, {len(heldout)} held-out tasks "
          f"in {data}", flush=True)

    # ---- the two trainings, then the trained modules from their checkpoints
    fits = run_fits(args, data)
    start = time.perf_counter()
    encoder, dm = load_run(fits["encoder"][0])
    baseline, emb_dm = load_run(fits["puzzle_emb"][0])
    if len(dm.eval_tasks) != len(heldout) or len(dm.train_tasks) != len(train):
        raise RuntimeError(f"the datamodule kept {len(dm.train_tasks)}/{len(train)} training and "
                           f"{len(dm.eval_tasks)}/{len(heldout)} held-out tasks (canvas too small?)")
    batch = dm.queries("eval", [0]).batch()  # every held-out query, original version
    rule_by_id = {task.task_id: rule_of(task).name for task in heldout}  # loaded tasks' source is the path
    rule_names = [rule_by_id[dm.eval_tasks[int(t)].task_id] for t in batch["task_index"]]
    index = {name: i for i, name in enumerate(sorted(set(rule_names)))}
    rule_ids = torch.tensor([index[name] for name in rule_names])
    if bool(batch["puzzle_id"].any()):  # the table trained rows for them: data.train_on_eval_demos was on
        raise RuntimeError("held-out queries must carry the blank puzzle id (is data.train_on_eval_demos on?)")

    real = score(encoder, batch)
    shuffled = shuffled_context(encoder, batch, rule_ids)
    base = score(baseline, batch)
    n = real.exact.numel()

    limit = args.train_eval_queries
    seen = {}
    if limit:
        seen["encoder"] = score(encoder, dm.queries("train", [0]).batch(limit))
        seen["puzzle_emb"] = score(baseline, emb_dm.queries("train", [0]).batch(limit))
    eval_s = time.perf_counter() - start

    # ---- report
    families = [name.partition("(")[0] for name in rule_names]
    print(f"\nfewshot: held-out queries solved exactly, by family ({len(heldout_rules)} held-out rules, "
          f"{len(heldout)} tasks)")
    print(f"  {'family':<10} {'n':>4} {'heldout':>16} {'shuffled_context':>18} {'puzzle_emb':>16}")
    for family in dict.fromkeys(f for f in FEWSHOT_FAMILIES if f in families):
        rows = torch.tensor([f == family for f in families])
        k = int(rows.sum())
        print(f"  {family:<10} {k:>4} {pct(real.count(rows), k):>16} {pct(shuffled.count(rows), k):>18} "
              f"{pct(base.count(rows), k):>16}")
    print(f"  {'all':<10} {n:>4} {pct(real.count(), n):>16} {pct(shuffled.count(), n):>18} {pct(base.count(), n):>16}")
    print(f"fewshot: held-out cell accuracy (mean over queries): heldout {real.cell.mean():.3f}, "
          f"shuffled_context {shuffled.cell.mean():.3f}, puzzle_emb_baseline {base.cell.mean():.3f}")
    if seen:
        print("fewshot: training queries (trained on; a check that training worked): " + ", ".join(
            f"{name} {pct(sc.count(), sc.exact.numel())} exact, cell {sc.cell.mean():.3f}" for name, sc in seen.items()))
    print(f"fewshot: time: encoder fit {fits['encoder'][1]:.0f} s, puzzle_emb fit {fits['puzzle_emb'][1]:.0f} s "
          f"({'concurrently' if args.jobs > 1 else 'one after the other'}, {args.threads} thread(s) each), "
          f"evaluation {eval_s:.0f} s, total {time.perf_counter() - wall:.0f} s; runs in {out}")
    line = (f"fewshot: heldout={real.count()}/{n} shuffled_context={shuffled.count()}/{n} "
            f"puzzle_emb_baseline={base.count()}/{n}")
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
