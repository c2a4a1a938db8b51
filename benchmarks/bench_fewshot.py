"""Held-out-rule benchmark (few-shot), a gate: can encoder-TRM solve a rule it never trained on by reading its demos?

    python benchmarks/bench_fewshot.py                 # `make bench-fewshot`: the whole thing on the CPU
    python benchmarks/bench_fewshot.py --steps 20 --train-tasks 64   # a smoke run (it will FAIL the targets)

1. Tasks (``trm_lightning/data/fewshot_rules.py``, :func:`make_fewshot_split`): every rule is ``family(s, c)``, a
   structural operation ``s`` (dihedral transform, gravity side, ray direction, fill mode, size rank, tiling
   mode, source colour) drawing in colour ``c``. The split holds out (s, c) combinations: a held-out rule never
   occurs in training, but its parts do, and within a family all tasks draw inputs from one distribution, so
   a held-out query is ambiguous without its demos. Three task sets: the training tasks (written under ``--out``,
   or, with ``--fresh-tasks``, generated on the fly by the datamodule, a new set every epoch), the held-out tasks
   (one per held-out rule, round robin) and *new* tasks of the training rules (another random stream: demos and
   queries training never saw), on which the ``train`` number is measured.
2. Two trainings through the real CLI (``configs/fewshot_cpu.yaml``): encoder-TRM
   (``model.conditioner=StandardDemoEncoder``) and TRM's puzzle-id baseline (``model.conditioner=PuzzleEmbedding``),
   same model and steps, concurrently (one core each). The baseline always trains on the written task set: a
   puzzle id needs a task that repeats.
3. Every query of the original version, one rollout each (``model.rollout``, exactly ``halt_max_steps`` ACT steps),
   counted as exact matches (every cell and the EOS border right):

   - ``heldout``: encoder-TRM on the held-out rules, with the context of the query's own demos;
   - ``shuffled_context``: the same queries, each row given the context of a row of *another rule* (a fixed
     derangement over rules, as ``callbacks.ContextReliance`` does over tasks). The gap to ``heldout`` is the
     evidence that the answers come from reading the demos;
   - ``puzzle_emb_baseline``: the puzzle-id model on the held-out queries. A held-out task was never trained, so
     its rows carry the blank id (an all-zero prefix): it shows what the query input alone gives;
   - ``train``: encoder-TRM on the new tasks of the training rules (generalisation to new tasks of known rules).

   ``data.train_on_eval_demos`` stays off: with it (TRM's protocol) both models would train on the held-out
   tasks' demo pairs and the number would measure test-time training, not few-shot generalisation. Augmentation
   is off as well (``data.num_train_augmentations: 1``): a colour permutation or dihedral transform of a task is
   another rule of the family, possibly a held-out one.

The last line is the verdict, ``fewshot: PASS heldout=<a>/<n> (<p>%) shuffled_context=<b>/<n>
puzzle_emb_baseline=<c>/<n> train=<d>/<m>`` or ``fewshot: FAIL ... (<why>)`` with exit status 1. The targets
(``--min-train``, ``--min-heldout``, ``--max-shuffled``, ``--max-baseline``) default to the issue's: train >= 90%,
heldout >= 50%, shuffled <= 5%, baseline <= 5%. Above it: per-family counts and cell accuracies. Extra ``trm``
options for both fits go after ``--``, e.g. ``-- --model.hidden_size=96``; ``--encoder-config FILE`` adds a YAML
(an experiment overlay) to the encoder fit only. ``--record FILE`` appends the numbers as one JSON line.
``--curve-every N`` keeps a checkpoint of the encoder fit every N steps and scores each one after the fit, as the
final model is scored (``fewshot curve step=<s> heldout=<a>/<n> ...`` lines): the budget curve of the gate's numbers.

The functions :func:`make_tasks`, :func:`query_batch`, :func:`score`, :func:`shuffled_context` and :func:`verdict`
are the benchmark's pieces for other scripts (test-time adaptation is measured on the same tasks and scores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_fewshot.py` from anywhere
    sys.path.insert(0, str(ROOT))

from callbacks.context_reliance import derangement  # noqa: E402
from trm_lightning.data.arc import ArcTask  # noqa: E402
from trm_lightning.data.datamodule import ARCDataModule  # noqa: E402
from trm_lightning.data.episodes import query_episodes  # noqa: E402
from trm_lightning.data.fewshot_rules import (  # noqa: E402
    FEWSHOT_FAMILIES,
    NEW_TASK_STREAM,
    FewshotRule,
    make_fewshot_split,
    make_rule_tasks,
    parse_rule,
    rule_of,
    split_rules,
)
from trm_lightning.data.task_json import write_task_dir  # noqa: E402
from trm_lightning.data.tokenize import crop_canvas  # noqa: E402
from trm_lightning.losses import row_accuracy  # noqa: E402
from trm_lightning.module import TRMLitModule  # noqa: E402
from trm_lightning.run_files import FEWSHOT_EVAL_FILE, LAST_CHECKPOINT, checkpoint_dir  # noqa: E402

CONFIG = ROOT / "configs" / "fewshot_cpu.yaml"
CONDITIONERS = {"encoder": "StandardDemoEncoder", "puzzle_emb": "PuzzleEmbedding"}  # run label -> model.conditioner
RUN_VERSION = "bench"  # runs land in <out>/<conditioning>/bench/ (replaced by the next run)
CURVE_CHECKPOINT = "curve_step"  # --curve-every's checkpoints: checkpoints/curve_step<global step>.ckpt


def add_task_arguments(p: argparse.ArgumentParser, families_default: list[str] | None = None,
                       families_help: str = "rule families (default: all)") -> None:
    """The options that decide the benchmark's tasks (:func:`make_tasks`), shared with ``sweep_fewshot.py``."""
    p.add_argument("--train-tasks", type=int, default=4000, help="written training tasks (over the training rules)")
    p.add_argument("--heldout-tasks", type=int, default=None,
                   help="held-out tasks, round robin over the held-out rules (default: two per rule)")
    p.add_argument("--new-tasks", type=int, default=None,
                   help="new tasks of the training rules, the `train` number (default: one per training rule)")
    p.add_argument("--heldout-fraction", type=float, default=0.25, help="share of each family's rules held out")
    p.add_argument("--families", nargs="+", default=families_default, choices=FEWSHOT_FAMILIES, help=families_help)
    p.add_argument("--demos", type=int, default=3, help="demo pairs per task")
    p.add_argument("--max-side", type=int, default=6, help="largest grid side (the canvas is the config's)")
    p.add_argument("--seed", type=int, default=0, help="task generation and training seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="the trm config both fits start from")
    p.add_argument("--encoder-config", action="append", default=[],
                   help="an extra YAML for the encoder fit only (after --config; e.g. an experiment overlay)")
    p.add_argument("--steps", type=int, default=None, help="encoder-TRM training steps (default: the config's)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="puzzle-id baseline training steps (default: the same as --steps)")
    p.add_argument("--fresh-tasks", action=argparse.BooleanOptionalAction, default=None,
                   help="encoder-TRM trains on tasks generated on the fly (data.fresh_tasks: data.episodes_per_epoch "
                        "new tasks every epoch, never repeated) instead of the written ones (default: the config's)")
    add_task_arguments(p, families_help="rule families (default: the config's data.fresh_tasks families, else all)")
    p.add_argument("--models", nargs="+", default=list(CONDITIONERS), choices=list(CONDITIONERS),
                   help="which fits to run (the verdict needs both)")
    p.add_argument("--conditioner", default=CONDITIONERS["encoder"], metavar="CLASS",
                   help="the encoder fit's model.conditioner class (e.g. trm_lightning.rule_oracle."
                        "RulePartOracle: a perfect demo reader with a factorised context, to test the decoder alone)")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="fits at a time: 2 trains both models concurrently (one core each on a 2-core CPU)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per fit (OMP_NUM_THREADS)")
    p.add_argument("--min-train", type=float, default=0.9, help="target: exact on new tasks of training rules")
    p.add_argument("--min-heldout", type=float, default=0.5, help="target: exact on held-out rules")
    p.add_argument("--max-shuffled", type=float, default=0.05, help="target: shuffled-context exact at most this")
    p.add_argument("--max-baseline", type=float, default=0.05, help="target: puzzle-id baseline exact at most this")
    p.add_argument("--out", default=str(ROOT / "runs" / "fewshot"), help="task directories and run logs go here")
    p.add_argument("--record", default=None, help="append the numbers as one JSON line to this file")
    p.add_argument("--curve-every", type=int, default=None, metavar="N",
                   help="the encoder fit also keeps a checkpoint every N steps; each is scored after the fit (a "
                        "`fewshot curve step=...` line per checkpoint, and `curve` in fewshot_eval.json): is the "
                        "recipe still learning when the budget ends?")
    p.add_argument("--probe-tasks", type=int, default=8, metavar="K",
                   help="linear probes of the encoder's context: K new tasks per training rule fit one probe per "
                        "family for s and one for c, scored on the new tasks of the training rules and on the "
                        "held-out rules (does the context say s and c apart?); 0: no probe")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: score the runs an earlier call with the same task options left under --out "
                        "(e.g. to get the answer and probe tables of an older run)")
    p.add_argument("overrides", nargs="*", help="extra trm options for both fits, after --")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------- tasks
@dataclass
class FewshotTasks:
    """The benchmark's task sets: ``train`` (written for the fits), ``heldout`` (held-out rules) and ``new`` (new
    tasks of the training rules), with the rule split they come from."""

    train_rules: list[FewshotRule]
    heldout_rules: list[FewshotRule]
    train: list[ArcTask]
    heldout: list[ArcTask]
    new: list[ArcTask]
    rule_by_id: dict[str, str] = field(default_factory=dict)  # task id -> rule name (loaded tasks lose the source)


def make_tasks(
    families: list[str], seed: int, n_train: int, n_heldout: int | None = None, n_new: int | None = None,
    heldout_fraction: float = 0.25, n_demos: int = 3, max_side: int = 6,
) -> FewshotTasks:
    """The three task sets for ``seed`` (deterministic). A new task whose query pair also occurs in a training task
    is dropped (never happened in the sizes used, but ``train`` must measure unseen queries)."""
    train_rules, heldout_rules = split_rules(families, heldout_fraction, seed)
    n_heldout = 2 * len(heldout_rules) if n_heldout is None else n_heldout
    n_new = len(train_rules) if n_new is None else n_new
    common = dict(n_demos=n_demos, max_side=max_side)
    train, heldout = make_fewshot_split(max(1, n_train), n_heldout, seed, families=families,
                                        heldout_fraction=heldout_fraction, **common)
    new = make_rule_tasks(train_rules, n_new, seed=seed, prefix="fs_new_", stream=NEW_TASK_STREAM, **common)
    trained = set().union(*(t.pair_hashes() for t in train))
    new = [t for t in new if not (t.pair_hashes() & trained)]
    tasks = FewshotTasks(train_rules, heldout_rules, train, heldout, new)
    tasks.rule_by_id = {t.task_id: rule_of(t).name for t in train + heldout + new}
    return tasks


def query_batch(tasks: list[ArcTask], dm: ARCDataModule) -> dict[str, torch.Tensor]:
    """Every test query of ``tasks`` (original version) as one batch, on the datamodule's canvas and demo slots."""
    return query_episodes(tasks, dm.canvas_size, dm.max_demos, [0], seed=dm.seed).batch()


# ------------------------------------------------------------------------------------------------- training
def fit_command(args: argparse.Namespace, data: Path, conditioning: str, steps: int | None, name: str | None = None,
                version: str = RUN_VERSION, extra: list[str] | None = None) -> list[str]:
    """``python -m trm_lightning fit ...`` (the ``trm fit`` CLI) for one of the two models; the run lands in
    ``<args.out>/<name>/<version>`` (``name`` defaults to ``conditioning``); ``extra`` YAMLs go after ``--config``
    (default: ``--encoder-config`` for the encoder fit)."""
    if extra is None:
        extra = args.encoder_config if conditioning == "encoder" else []
    curve = []
    if conditioning == "encoder" and getattr(args, "curve_every", None):
        curve = [f"--checkpoint.every_n_train_steps={args.curve_every}", "--checkpoint.monitor=null",
                 "--checkpoint.save_top_k=-1", f"--checkpoint.filename={CURVE_CHECKPOINT}{{step}}"]
    fresh = ["--data.fresh_tasks=null"]  # the baseline (a puzzle id needs a task that repeats), or --no-fresh-tasks
    if conditioning == "encoder" and args.fresh_tasks:  # the same split as the written held-out tasks
        fresh = [f"--data.fresh_tasks.families=[{','.join(args.families)}]",
                 f"--data.fresh_tasks.heldout_fraction={args.heldout_fraction}",
                 f"--data.fresh_tasks.split_seed={args.seed}",
                 f"--data.fresh_tasks.n_demos={args.demos}",
                 f"--data.fresh_tasks.max_side={args.max_side}"]
    return [
        sys.executable, "-m", "trm_lightning", "fit",
        "--config", str(args.config),
        *[a for path in extra for a in ("--config", str(path))],
        f"--data.train_source={data / 'train'}",
        f"--data.eval_source={data / 'heldout'}",
        f"--seed_everything={args.seed}",
        f"--trainer.logger.init_args.save_dir={args.out}",
        f"--trainer.logger.init_args.name={name or conditioning}",
        f"--trainer.logger.init_args.version={version}",
        *([] if steps is None else [f"--trainer.max_steps={steps}"]),
        *fresh,
        *curve,
        *args.overrides,
        # last: choosing another conditioner class drops the encoder knobs the overrides may set
        f"--model.conditioner={conditioner_class(args, conditioning)}",
    ]


def conditioner_class(args: argparse.Namespace, conditioning: str) -> str:
    """The ``model.conditioner`` of a fit: the baseline's puzzle table, or the encoder fit's ``--conditioner``
    (callers without that option, e.g. the sweep, get the StandardDemoEncoder)."""
    if conditioning == "encoder":
        return getattr(args, "conditioner", None) or CONDITIONERS["encoder"]
    return CONDITIONERS[conditioning]


def run_fits(args: argparse.Namespace, data: Path) -> dict[str, tuple[Path, float]]:
    """Train the ``--models`` (concurrently with ``--jobs 2``, each on ``--threads`` threads); returns, per
    conditioning, its run directory and the fit's wall seconds. A failed fit prints its log's tail and exits 1."""
    out = Path(args.out)
    steps = {"encoder": args.steps, "puzzle_emb": args.baseline_steps if args.baseline_steps is not None else args.steps}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    pending = [name for name in CONDITIONERS if name in args.models]
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


def existing_runs(args: argparse.Namespace) -> dict[str, tuple[Path, float]]:
    """``--rescore``: the ``--models`` runs already under ``--out`` (fit seconds 0); exits when one is missing."""
    runs = {}
    for name in (n for n in CONDITIONERS if n in args.models):
        run_dir = Path(args.out) / name / RUN_VERSION
        if not (Path(checkpoint_dir(run_dir)) / LAST_CHECKPOINT).is_file():
            sys.exit(f"fewshot: --rescore: no {LAST_CHECKPOINT} of the {name} fit under {run_dir} (train it first, "
                     f"or pass --models with the fits that exist)")
        runs[name] = (run_dir, 0.0)
    return runs


def load_run(run_dir: Path) -> tuple[TRMLitModule, ARCDataModule]:
    """The trained module (``checkpoints/last.ckpt``) and its datamodule, rebuilt from the checkpoint's
    hyperparameters and set up (the same tasks in the same order as in training)."""
    path = Path(checkpoint_dir(run_dir)) / LAST_CHECKPOINT
    model = TRMLitModule.load_from_checkpoint(path, map_location="cpu")
    dm = ARCDataModule.load_from_checkpoint(path)
    dm.setup()
    return model.eval(), dm


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Score:
    """Per query: ``exact`` (N,) bool, every supervised cell right; ``cell`` (N,) the fraction of them right;
    ``answers`` (N, T) the predicted canvas tokens (None where a score was built without them)."""

    exact: torch.Tensor
    cell: torch.Tensor
    answers: torch.Tensor | None = None

    def count(self, rows: torch.Tensor | None = None) -> int:
        return int(self.exact.sum() if rows is None else self.exact[rows].sum())

    @property
    def n(self) -> int:
        return int(self.exact.numel())


@torch.no_grad()
def score(model, batch: dict[str, torch.Tensor], context: torch.Tensor | None = None, chunk: int = 64) -> Score:
    """One evaluation rollout per row, in chunks of ``chunk`` rows; ``context`` (N, P, D), when given, replaces
    the rows' own context. ``model`` is a :class:`TRMLitModule` or a bare ``EncoderTRM``."""
    net = getattr(model, "model", model)
    net.eval()
    exact, cells, answers = [], [], []
    for start in range(0, batch["inputs"].shape[0], chunk):
        part = {k: v[start : start + chunk] for k, v in batch.items()}
        own = None if context is None else context[start : start + chunk]
        predicted = net.rollout(part, context=own).logits.argmax(-1)
        has, hit, cell = row_accuracy(predicted, part["labels"])
        if not bool(has.all()):
            raise RuntimeError("an evaluation query without a known output")
        exact.append(hit)
        cells.append(cell)
        answers.append(predicted)
    return Score(torch.cat(exact), torch.cat(cells), torch.cat(answers))


def shuffled_context(model, batch: dict[str, torch.Tensor], rule_ids: torch.Tensor, chunk: int = 64) -> Score:
    """The score with each row given the context of a row of another rule: one derangement over the whole batch,
    grouped by rule (:func:`callbacks.context_reliance.derangement`)."""
    perm = derangement(rule_ids)
    if perm is None:
        raise RuntimeError("the shuffled-context control needs at least two held-out queries")
    if bool((rule_ids[perm] == rule_ids).any()):
        raise RuntimeError("a held-out rule holds more than half the queries: its rows cannot all be shuffled")
    net = getattr(model, "model", model)
    return score(net, batch, contexts(net, batch, chunk)[perm], chunk)


def task_batches(tasks: FewshotTasks, dm: ARCDataModule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The held-out queries and the new tasks' queries as batches on ``dm``'s canvas (every held-out task kept)."""
    if len(dm.eval_tasks) != len(tasks.heldout):
        raise RuntimeError(f"the datamodule kept {len(dm.eval_tasks)}/{len(tasks.heldout)} held-out tasks "
                           "(canvas too small?)")
    return query_batch(tasks.heldout, dm), query_batch(tasks.new, dm)


def evaluate_encoder(model, tasks: FewshotTasks, held_batch: dict, new_batch: dict) -> dict[str, Score]:
    """``heldout``, ``shuffled_context`` (held-out queries, another rule's context) and ``train`` (new tasks of the
    training rules) of an encoder-TRM."""
    names = rule_names(held_batch, tasks.heldout, tasks.rule_by_id)
    return {"heldout": score(model, held_batch),
            "shuffled_context": shuffled_context(model, held_batch, rule_index(names)),
            "train": score(model, new_batch)}


def evaluate_baseline(model, held_batch: dict, new_batch: dict) -> dict[str, Score]:
    """``puzzle_emb_baseline`` (held-out queries, blank id) and ``baseline_new`` of the puzzle-id model."""
    if bool(held_batch["puzzle_id"].any()):
        raise RuntimeError("held-out queries must carry the blank puzzle id")
    return {"puzzle_emb_baseline": score(model, held_batch), "baseline_new": score(model, new_batch)}


def curve_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``--curve-every``'s checkpoints of a run, as (global step, path), in step order."""
    found = []
    for path in Path(checkpoint_dir(run_dir)).glob(f"{CURVE_CHECKPOINT}*.ckpt"):
        step = path.stem[len(CURVE_CHECKPOINT):]
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def score_curve(run_dir: Path, tasks: FewshotTasks, held_batch: dict, new_batch: dict) -> list[dict]:
    """Every ``--curve-every`` checkpoint of the encoder fit scored as the final model is: per step, ``[solved, n,
    cell accuracy]`` of ``heldout``, ``shuffled_context`` and ``train``; prints one ``fewshot curve`` line each."""
    curve = []
    for step, path in curve_checkpoints(run_dir):
        model = TRMLitModule.load_from_checkpoint(path, map_location="cpu").eval()
        scores = evaluate_encoder(model, tasks, held_batch, new_batch)
        curve.append({"step": step, **{name: [sc.count(), sc.n, float(sc.cell.mean())] for name, sc in scores.items()}})
        print(f"fewshot curve step={step} " + " ".join(
            f"{name}={sc.count()}/{sc.n} cell={float(sc.cell.mean()):.3f}" for name, sc in scores.items()), flush=True)
    return curve


def write_fewshot_eval(run_dir: Path, scores: dict[str, Score], tasks: FewshotTasks, **extra) -> Path:
    """``<run_dir>/fewshot_eval.json`` (:data:`~trm_lightning.run_files.FEWSHOT_EVAL_FILE`): per score its exact
    count, queries and mean cell accuracy, and the task split; ``trm report`` reads it."""
    record = {
        "benchmark": "fewshot held-out rules (benchmarks/bench_fewshot.py)",
        "families": sorted({r.family for r in tasks.train_rules + tasks.heldout_rules}),
        "train_rules": len(tasks.train_rules), "heldout_rules": len(tasks.heldout_rules),
        "scores": {name: {"solved": sc.count(), "n": sc.n, "cell_accuracy": float(sc.cell.mean()) if sc.n else None}
                   for name, sc in scores.items()},
        **extra,
    }
    path = Path(run_dir) / FEWSHOT_EVAL_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


PROBE_TASK_STREAM = 0x7A60  # the probe's fitting tasks: new tasks of the training rules, another stream


@torch.no_grad()
def contexts(model, batch: dict[str, torch.Tensor], chunk: int = 64) -> torch.Tensor:
    """The encoder's context (N, P, D) of every row of ``batch``, in chunks of ``chunk`` rows."""
    net = getattr(model, "model", model)
    net.eval()
    rows = batch["inputs"].shape[0]
    return torch.cat([net.encode({k: v[i : i + chunk] for k, v in batch.items()}) for i in range(0, rows, chunk)])


def linear_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300, l2: float = 1e-3, seed: int = 0):
    """A multinomial logistic regression of labels ``y`` (N,) on features ``x`` (N, F), standardised by ``x``'s
    statistics; returns ``predict(features) -> labels``."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    classes = torch.unique(y)
    target = torch.searchsorted(classes, y)
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], len(classes), generator=gen) * 1e-3).requires_grad_()
    bias = torch.zeros(len(classes), requires_grad=True)
    z = (x - mean) / std
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(z @ weight + bias, target) + l2 * weight.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    weight, bias = weight.detach(), bias.detach()
    return lambda features: classes[(((features - mean) / std) @ weight + bias).argmax(1)]


def probe_rule_parts(model, dm: ARCDataModule, tasks: FewshotTasks, held_batch: dict, new_batch: dict,
                     per_rule: int, seed: int, n_demos: int = 3, max_side: int = 6) -> dict[str, dict[str, list[int]]]:
    """Can ``s`` and ``c`` be read apart from the encoder's context? Per family, a linear probe for each, fitted on
    the contexts of ``per_rule`` new tasks of every training rule of the family (a stream of their own), scored on
    the benchmark's new tasks of the training rules (``new``) and on the held-out rules (``heldout``). A context
    that keeps ``s`` and ``c`` apart gives the held-out rules (unseen combinations of seen parts) the right
    labels; one that codes each rule as a whole does not. Returns ``{family: {"s_new": [right, n], "s_heldout":
    ..., "c_new": ..., "c_heldout": ...}}`` for the families with at least two training values of s."""
    fit_tasks = make_rule_tasks(tasks.train_rules, per_rule * len(tasks.train_rules), seed=seed, prefix="fs_probe_",
                                stream=PROBE_TASK_STREAM, n_demos=n_demos, max_side=max_side)
    fit_batch = query_batch(fit_tasks, dm)
    rules = {"fit": [rule_of(fit_tasks[int(t)]) for t in fit_batch["task_index"]],
             "new": [parse_rule(n) for n in rule_names(new_batch, tasks.new, tasks.rule_by_id)],
             "heldout": [parse_rule(n) for n in rule_names(held_batch, tasks.heldout, tasks.rule_by_id)]}
    x = {name: contexts(model, batch).flatten(1).float()
         for name, batch in (("fit", fit_batch), ("new", new_batch), ("heldout", held_batch))}
    table = {}
    for family in dict.fromkeys(r.family for r in tasks.train_rules):
        mine = {name: [r for r in split if r.family == family] for name, split in rules.items()}
        rows = {name: torch.tensor([r.family == family for r in split], dtype=torch.bool)
                for name, split in rules.items()}
        entry = {}
        for part in ("s", "c"):
            label = {name: torch.tensor([getattr(r, part) for r in split], dtype=torch.long)
                     for name, split in mine.items()}
            if len(torch.unique(label["fit"])) < 2:
                continue
            predict = linear_probe(x["fit"][rows["fit"]], label["fit"], seed=seed)
            for name in ("new", "heldout"):
                if mine[name]:
                    right = int((predict(x[name][rows[name]]) == label[name]).sum())
                    entry[f"{part}_{name}"] = [right, len(mine[name])]
        if entry:
            table[family] = entry
    return table


def report_probe(probe: dict[str, dict[str, list[int]]]) -> None:
    print("fewshot: linear probes of the encoder's context, by family: s and c read from it on new tasks of the "
          "training rules and on the held-out rules (probes fitted on other new tasks of the training rules)")
    keys = ("s_new", "s_heldout", "c_new", "c_heldout")
    print(f"  {'family':<10}" + "".join(f" {k:>14}" for k in keys))
    for family, entry in probe.items():
        cells = [f"{entry[k][0]}/{entry[k][1]}" if k in entry else "-" for k in keys]
        print(f"  {family:<10}" + "".join(f" {c:>14}" for c in cells))


ANSWER_KINDS = ("solved", "same s, other c", "same c, other s", "other rule", "input unchanged", "none")


def answer_kinds(sc: Score, batch: dict[str, torch.Tensor], names: list[str], rules: list[FewshotRule]) -> list[str]:
    """What each query's answer is, one of :data:`ANSWER_KINDS`: ``solved``; else the output of a rule of ``rules``
    of the query's family applied to its input, one with the query rule's ``s`` and another ``c``, or its ``c`` and
    another ``s``, or another one (``other rule``); else the input itself (``input unchanged``); else ``none``. On the
    held-out rules with ``rules`` = the training rules it tells a composed answer from a memorised one: a model that
    reads only part of the demos answers with the training rule that shares that part."""
    if sc.answers is None:
        raise ValueError("answer_kinds needs a Score with its answers (benchmarks/bench_fewshot.py: score)")
    by_family: dict[str, list[FewshotRule]] = {}
    for rule in rules:
        by_family.setdefault(rule.family, []).append(rule)
    kinds = []
    for row, name in enumerate(names):
        if bool(sc.exact[row]):
            kinds.append("solved")
            continue
        own = parse_rule(name)
        grid, answer = crop_canvas(batch["inputs"][row]), crop_canvas(sc.answers[row])
        matches = [r for r in by_family.get(own.family, []) if r != own and _gives(r, grid, answer)]
        if any(r.s == own.s for r in matches):
            kinds.append("same s, other c")
        elif any(r.c == own.c for r in matches):
            kinds.append("same c, other s")
        elif matches:
            kinds.append("other rule")
        elif np.array_equal(grid, answer):
            kinds.append("input unchanged")
        else:
            kinds.append("none")
    return kinds


def _gives(rule: FewshotRule, grid: np.ndarray, answer: np.ndarray) -> bool:
    try:
        out = rule.apply(grid)
    except ValueError:  # e.g. size() on a grid without objects
        return False
    return out.shape == answer.shape and np.array_equal(out, answer)


def rule_names(batch: dict[str, torch.Tensor], tasks: list[ArcTask], rule_by_id: dict[str, str]) -> list[str]:
    """The rule name of every row of a :func:`query_batch` of ``tasks``."""
    return [rule_by_id[tasks[int(t)].task_id] for t in batch["task_index"]]


def rule_index(names: list[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return torch.tensor([index[name] for name in names])


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.1f}%)" if n else f"{k}/0"


def verdict(scores: dict[str, Score], args: argparse.Namespace) -> tuple[bool, str]:
    """(passed, the closing line). ``scores`` holds ``heldout``, ``shuffled_context``, ``puzzle_emb_baseline`` and
    ``train`` (any may be missing: a missing one fails)."""
    targets = {  # name -> (at least?, target)
        "train": (True, args.min_train), "heldout": (True, args.min_heldout),
        "shuffled_context": (False, args.max_shuffled), "puzzle_emb_baseline": (False, args.max_baseline),
    }
    failed = []
    for name, (at_least, target) in targets.items():
        sc = scores.get(name)
        if sc is None or sc.n == 0:
            failed.append(f"{name} not measured")
            continue
        rate = sc.count() / sc.n
        if (rate < target) if at_least else (rate > target):
            failed.append(f"{name} {100 * rate:.1f}% {'<' if at_least else '>'} {100 * target:.0f}%")

    def part(name: str) -> str:
        sc = scores.get(name)
        return "n/a" if sc is None else f"{sc.count()}/{sc.n}"

    held = scores.get("heldout")
    held_text = part("heldout") + (f" ({100.0 * held.count() / held.n:.1f}%)" if held is not None and held.n else "")
    line = (f"fewshot: {'FAIL' if failed else 'PASS'} heldout={held_text} shuffled_context={part('shuffled_context')} "
            f"puzzle_emb_baseline={part('puzzle_emb_baseline')} train={part('train')}")
    if failed:
        line += " (" + "; ".join(failed) + ")"
    return not failed, line


def config_fresh_tasks(configs: list[str]) -> dict | None:
    """``data.fresh_tasks`` of the encoder fit's YAML files (the last that sets it wins; None: the written tasks)."""
    import yaml

    fresh = None
    for config in configs:
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
        if "fresh_tasks" in data:
            fresh = data["fresh_tasks"]
    return dict(fresh) if isinstance(fresh, dict) else None


def main(argv: list[str] | None = None) -> tuple[bool, str]:
    args = parse_args(argv)
    fresh = config_fresh_tasks([args.config, *args.encoder_config])
    if args.fresh_tasks is None:
        args.fresh_tasks = fresh is not None
    if args.families is None:
        args.families = list((fresh or {}).get("families") or FEWSHOT_FAMILIES)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out = Path(args.out)
    data = out / "data"

    # ---- tasks
    tasks = make_tasks(args.families, args.seed, args.train_tasks, args.heldout_tasks, args.new_tasks,
                       args.heldout_fraction, args.demos, args.max_side)
    for split in ("train", "heldout"):  # stale files of an earlier run would be read as tasks
        for old in (data / split).glob("*.json"):
            old.unlink()
    write_task_dir(tasks.train, data / "train")
    write_task_dir(tasks.heldout, data / "heldout")
    source = "tasks generated on the fly (new every epoch)" if args.fresh_tasks else f"{len(tasks.train)} training tasks"
    print(f"fewshot: {len(tasks.train_rules)} training rules, {len(tasks.heldout_rules)} held-out rules over "
          f"{len(args.families)} families ({' '.join(args.families)}); encoder trains on {source}; "
          f"{len(tasks.heldout)} held-out tasks, {len(tasks.new)} new tasks of training rules; in {data}", flush=True)

    # ---- the trainings, then the trained modules from their checkpoints
    fits = existing_runs(args) if args.rescore else run_fits(args, data)
    start = time.perf_counter()
    scores: dict[str, Score] = {}
    models = {name: load_run(run_dir) for name, (run_dir, _) in fits.items()}
    held_batch = new_batch = None
    for name, (model, dm) in models.items():
        held_batch, new_batch = task_batches(tasks, dm)
        if name == "encoder":
            scores.update(evaluate_encoder(model, tasks, held_batch, new_batch))
        else:
            scores.update(evaluate_baseline(model, held_batch, new_batch))
    curve = []
    if "encoder" in fits and args.curve_every:
        curve = score_curve(fits["encoder"][0], tasks, held_batch, new_batch)
    answers = answer_table(tasks, held_batch, new_batch, scores) if "encoder" in fits else {}
    probe = {}
    if "encoder" in fits and args.probe_tasks > 0:
        model, dm = models["encoder"]
        probe = probe_rule_parts(model, dm, tasks, held_batch, new_batch, args.probe_tasks, args.seed, args.demos,
                                 args.max_side)
    eval_s = time.perf_counter() - start
    if "encoder" in fits:
        write_fewshot_eval(fits["encoder"][0], scores, tasks, fit_seconds=fits["encoder"][1], answers=answers,
                           **({"probe": probe} if probe else {}), **({"curve": curve} if curve else {}))

    # ---- report
    if held_batch is not None:
        report(tasks, held_batch, new_batch, scores)
    if answers:
        report_answers(answers)
    if probe:
        report_probe(probe)
    times = ", ".join(f"{name} fit {seconds:.0f} s" for name, (_, seconds) in fits.items())
    times += f" ({'concurrently' if args.jobs > 1 else 'one after the other'}, {args.threads} thread(s) each)"
    if args.rescore:
        times = f"no fit ({' and '.join(fits)} rescored from the checkpoints)"
    print(f"fewshot: time: {times}, evaluation {eval_s:.0f} s, total {time.perf_counter() - wall:.0f} s; runs in {out}")
    passed, line = verdict(scores, args)
    if args.record:
        record = {"argv": argv if argv is not None else sys.argv[1:], "passed": passed, "line": line,
                  **({"rescored": True} if args.rescore else {}),
                  "fit_seconds": {name: s for name, (_, s) in fits.items()},
                  "total_seconds": time.perf_counter() - wall,
                  **{name: [sc.count(), sc.n, float(sc.cell.mean())] for name, sc in scores.items()},
                  **({"answers": answers} if answers else {}), **({"probe": probe} if probe else {}),
                  **({"curve": curve} if curve else {})}
        with open(args.record, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(line, flush=True)
    return passed, line


def answer_table(tasks: FewshotTasks, held_batch: dict, new_batch: dict,
                 scores: dict[str, Score]) -> dict[str, dict[str, dict[str, int]]]:
    """:func:`answer_kinds` of the encoder's ``heldout`` and ``train`` answers against the training rules, counted
    per family and in all: ``{score: {family or "all": {kind: queries}}}``."""
    table = {}
    for name, batch, split in (("heldout", held_batch, tasks.heldout), ("train", new_batch, tasks.new)):
        names = rule_names(batch, split, tasks.rule_by_id)
        kinds = answer_kinds(scores[name], batch, names, tasks.train_rules)
        counts: dict[str, dict[str, int]] = {}
        for rule, kind in zip(names, kinds):
            for key in (rule.partition("(")[0], "all"):
                row = counts.setdefault(key, dict.fromkeys(ANSWER_KINDS, 0))
                row[kind] += 1
        table[name] = {f: counts[f] for f in [*FEWSHOT_FAMILIES, "all"] if f in counts}
    return table


def report_answers(answers: dict[str, dict[str, dict[str, int]]]) -> None:
    """Per family, what the held-out answers are (:func:`answer_kinds`)."""
    print("fewshot: held-out answers, by family: the held-out rule's output (solved), else a training rule's with the "
          "same s or the same c, another training rule's, the input unchanged, or none of these")
    print(f"  {'family':<10}" + "".join(f" {kind:>16}" for kind in ANSWER_KINDS))
    for family, row in answers["heldout"].items():
        print(f"  {family:<10}" + "".join(f" {row[kind]:>16}" for kind in ANSWER_KINDS))


def report(tasks: FewshotTasks, held_batch: dict, new_batch: dict, scores: dict[str, Score]) -> None:
    """Per family: exact counts of every score (new tasks of training rules: ``train``), then cell accuracies."""
    held_fam = [n.partition("(")[0] for n in rule_names(held_batch, tasks.heldout, tasks.rule_by_id)]
    new_fam = [n.partition("(")[0] for n in rule_names(new_batch, tasks.new, tasks.rule_by_id)]
    columns = [("train", new_fam), ("heldout", held_fam), ("shuffled_context", held_fam),
               ("puzzle_emb_baseline", held_fam)]
    columns = [(name, fam) for name, fam in columns if name in scores]
    print(f"\nfewshot: queries solved exactly, by family ({len(tasks.heldout_rules)} held-out rules, "
          f"{len(tasks.heldout)} held-out tasks; train = {len(tasks.new)} new tasks of the training rules)")
    print(f"  {'family':<10}" + "".join(f" {name:>20}" for name, _ in columns))
    for family in dict.fromkeys(f for f in FEWSHOT_FAMILIES if f in held_fam + new_fam):
        cells = []
        for name, fam in columns:
            rows = torch.tensor([f == family for f in fam])
            cells.append(pct(scores[name].count(rows), int(rows.sum())))
        print(f"  {family:<10}" + "".join(f" {c:>20}" for c in cells))
    print(f"  {'all':<10}" + "".join(f" {pct(scores[name].count(), scores[name].n):>20}" for name, _ in columns))
    print("fewshot: cell accuracy (mean over queries), by family:")
    for family in dict.fromkeys(f for f in FEWSHOT_FAMILIES if f in held_fam + new_fam):
        cells = []
        for name, fam in columns:
            rows = torch.tensor([f == family for f in fam])
            cells.append(f"{float(scores[name].cell[rows].mean()):.3f}" if bool(rows.any()) else "-")
        print(f"  {family:<10}" + "".join(f" {c:>20}" for c in cells))
    print(f"  {'all':<10}" + "".join(f" {float(scores[name].cell.mean()):>20.3f}" for name, _ in columns))
    if "baseline_new" in scores:
        sc = scores["baseline_new"]
        print(f"fewshot: puzzle_emb_baseline on the new tasks of the training rules (blank id): {pct(sc.count(), sc.n)}")


if __name__ == "__main__":
    ok, _ = main()
    sys.exit(0 if ok else 1)
