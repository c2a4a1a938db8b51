"""Test-time adaptation: the trained model also learns from each evaluation task's own demo pairs, at test time.

Every strong ARC result adapts to each task; here it starts from the encoder's context (or the trained weights)
and is reset for every task. The objective uses only the task's demo pairs, never a test output: each demo pair is
the query once, the others are its demos (leave-one-out), under the task's evaluation versions (dihedral x colour
augmentations, as voting uses them), and the loss is the training loss of every ACT step of a rollout (TRM's deep
supervision). Two methods:

- ``context``: gradient steps (Adam) on the context tokens alone, one context per evaluation version of the task,
  each initialised from the encoder's output on that version's demos; the weights are not touched. The adapted
  context then replaces the encoder's for that version's test queries. It works for any conditioner, the puzzle-id
  table included (its context starts as the blank id's zeros for a held-out task).
- ``finetune``: the same objective on chosen parameters (``encoder``, ``trm`` or ``all``), with the encoder
  computing each leave-one-out row's context from the other demos; the weights are restored to the trained ones
  before the next task (in place: no allocation per task). Low-rank adapters are not supported.

Both are pure functions of (model, task's demos, seed-free config): adapting task A then B gives B exactly what
adapting B alone gives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from trm_lightning.checks import check_at_least
from trm_lightning.data.episodes import TaskDemos
from trm_lightning.errors import ConfigError
from trm_lightning.losses import act_loss
from trm_lightning.models.encoder_trm import EncoderTRM

METHODS = ("context", "finetune")
PARAMETER_SETS = ("encoder", "trm", "all")


@dataclass
class AdaptationConfig:
    """Test-time adaptation for ``trm test`` and ``trm predict`` (none by default).

    Attributes:
        methods: the adaptations to evaluate, in order, besides no adaptation: ``context`` and/or ``finetune``.
            ``trm test`` scores each and prints them side by side; ``submission.json`` holds the last one's votes.
        context_steps: Adam steps on the context tokens per task.
        context_lr: their learning rate.
        finetune_steps: Adam steps on the chosen parameters per task.
        finetune_lr: their learning rate.
        finetune_params: which parameters ``finetune`` trains: ``encoder`` (the conditioner), ``trm`` or ``all``.
        finetune_augmentations: how many of the task's evaluation versions (``data.test_augmentations``, in order,
            the original first) the ``finetune`` objective uses; None: all of them. (``context`` adapts one context
            per version, on that version's demos.)
        time_budget_s: per task and method, stop taking steps once this many seconds have passed; None: no limit.
        task_batch: ``context`` adapts this many tasks together, in one batch (each task's contexts still get
            exactly their own gradient); 1: one task at a time. ``finetune`` adapts one task at a time.
    """

    methods: list[Literal["context", "finetune"]] = field(default_factory=list)
    context_steps: int = 32
    context_lr: float = 1e-2
    finetune_steps: int = 32
    finetune_lr: float = 1e-4
    finetune_params: Literal["encoder", "trm", "all"] = "all"
    finetune_augmentations: int | None = None
    time_budget_s: float | None = None
    task_batch: int = 8

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"model.adaptation.methods: {method!r} is not one of {METHODS}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"model.adaptation.methods lists a method twice: {self.methods}")
        if self.finetune_params not in PARAMETER_SETS:
            raise ConfigError(f"model.adaptation.finetune_params must be one of {PARAMETER_SETS}, "
                              f"got {self.finetune_params!r}")
        for key in ("context_steps", "finetune_steps", "task_batch"):
            check_at_least(f"model.adaptation.{key}", getattr(self, key), 1)
        for key in ("context_lr", "finetune_lr"):
            check_at_least(f"model.adaptation.{key}", getattr(self, key), 0)
        check_at_least("model.adaptation.finetune_augmentations", self.finetune_augmentations, 1, allow_none=True)
        check_at_least("model.adaptation.time_budget_s", self.time_budget_s, 0, allow_none=True)

    def steps(self, method: str) -> int:
        return self.context_steps if method == "context" else self.finetune_steps

    def label(self, method: str) -> str:
        """``context, 32 steps`` / ``finetune (all), 32 steps``, for the side-by-side line and the records."""
        what = method if method == "context" else f"{method} ({self.finetune_params})"
        return f"{what}, {self.steps(method)} steps"


def protocol(config: AdaptationConfig | None, method: str | None, train_on_eval_demos: bool) -> str:
    """How a result was obtained: ``held-out`` (no adaptation, no evaluation data in training), ``held-out +
    test-time adaptation (<method>, <k> steps)`` or ``TRM protocol`` (evaluation demos in training)."""
    if train_on_eval_demos:
        base = "TRM protocol"
        return base if method is None else f"{base} + test-time adaptation ({config.label(method)})"
    return "held-out" if method is None else f"held-out + test-time adaptation ({config.label(method)})"


def deep_supervision_loss(model: EncoderTRM, batch: Mapping[str, Tensor], context: Tensor | None = None,
                          row_weight: Tensor | None = None) -> Tensor:
    """Mean over rows (or the ``row_weight``-weighted sum) and over the rollout's ``halt_max_steps`` ACT steps of the
    training loss of each step (the supervision every step gets in training); ``context`` replaces the
    conditioner's."""
    if context is None:
        context = model.encode(batch)
    trm = model.trm
    x = trm.embed(batch["inputs"], context)
    y, z = trm.initial_states(batch["inputs"])
    total = x.new_zeros((), dtype=torch.float32)
    for _ in range(trm.halt_max_steps):
        y, z, logits, q = trm(y, z, x)
        total = total + act_loss(logits, batch["labels"], q[:, 0], row_weight=row_weight).loss
    return total / trm.halt_max_steps


class _Adam:
    """Adam on a fixed list of tensors, with its moment buffers allocated once and zeroed per task."""

    def __init__(self, tensors: Sequence[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.tensors, self.lr, self.betas, self.eps = list(tensors), lr, betas, eps
        self.m = [torch.zeros_like(t) for t in self.tensors]
        self.v = [torch.zeros_like(t) for t in self.tensors]
        self.t = 0

    def reset(self) -> None:
        self.t = 0
        for buf in self.m + self.v:
            buf.zero_()

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.tensors, grads, self.m, self.v):
            m.lerp_(g, 1 - b1)
            v.lerp_(g * g, 1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.sub_(self.lr * (m / (1 - b1**self.t)) / denom)


def _out_of_time(start: float, budget: float | None) -> bool:
    return budget is not None and time.perf_counter() - start > budget


def adapt_contexts(model: EncoderTRM, demos: TaskDemos, config: AdaptationConfig) -> tuple[Tensor, int]:
    """The ``context`` method for one task: (contexts (versions, P, D) after the steps, steps taken)."""
    return adapt_context_group(model, [demos], config)[0]


def adapt_context_group(model: EncoderTRM, group: Sequence[TaskDemos], config: AdaptationConfig
                        ) -> list[tuple[Tensor, int]]:
    """The ``context`` method for several tasks at once, in one batch: per task (its contexts, steps taken).

    The tasks' leave-one-out rows are concatenated and each row reads its own task's context; the loss is the sum
    over tasks of each task's mean, so each task's contexts get exactly the gradient they would alone (rows never
    interact: attention, norms and the loss are per row), and Adam acts elementwise: a task's result does not depend
    on its companions, up to the rounding of a larger batch. The time budget of the group is ``time_budget_s`` times
    its number of tasks."""
    with torch.no_grad():
        full = _concat([d.full for d in group])
        encoded = model.encode(full).detach()
    sizes = [len(d.versions) for d in group]
    contexts = list(encoded.split(sizes))
    learn = [i for i, d in enumerate(group) if d.leave_one_out is not None]
    if not learn:
        return [(c.clone(), 0) for c in contexts]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    batch = _concat([group[i].leave_one_out for i in learn])
    slot = torch.cat([group[i].version_of_row + offsets[i] for i in learn]).to(encoded.device)
    rows = [int(group[i].version_of_row.numel()) for i in learn]
    weight = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64) for n in rows]).to(encoded.device)
    context = encoded.clone().requires_grad_(True)
    adam = _Adam([context], config.context_lr)
    budget = None if config.time_budget_s is None else config.time_budget_s * len(group)
    start, taken = time.perf_counter(), 0
    for _ in range(config.context_steps):
        if _out_of_time(start, budget):
            break
        loss = deep_supervision_loss(model, batch, context[slot], row_weight=weight)
        (grad,) = torch.autograd.grad(loss, [context])  # the weights get no gradient
        adam.step([grad])
        taken += 1
    adapted = context.detach().split(sizes)
    learned = set(learn)
    return [(adapted[i].clone(), taken if i in learned else 0) for i in range(len(group))]


def _concat(batches: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    if len(batches) == 1:
        return dict(batches[0])
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def parameters_for(model: EncoderTRM, which: str) -> list[nn.Parameter]:
    """The trainable parameters ``finetune`` adapts: the conditioner's, the TRM core's, or all."""
    modules = {"encoder": [model.conditioner], "trm": [model.trm], "all": [model]}[which]
    return [p for m in modules for p in m.parameters() if p.requires_grad]


class Finetuner:
    """The ``finetune`` method: per task, Adam steps on the chosen parameters, used, then undone.

    Everything it needs is allocated once (a copy of the trained weights, the moment buffers), so a task costs
    no allocation; :meth:`adapted` restores the trained weights on exit, whatever happens inside.
    """

    def __init__(self, model: EncoderTRM, config: AdaptationConfig) -> None:
        self.model, self.config = model, config
        self.params = parameters_for(model, config.finetune_params)
        if not self.params:
            raise ConfigError(f"model.adaptation.finetune_params={config.finetune_params}: no trainable parameter "
                              "(the puzzle-id table is not a parameter; use the context method)")
        self.trained = [p.detach().clone() for p in self.params]
        self.adam = _Adam(self.params, config.finetune_lr)

    @contextmanager
    def adapted(self, demos: TaskDemos) -> Iterator[int]:
        """Adapt to one task; inside the ``with`` block the model holds the adapted weights (yields the steps
        taken); on exit it holds the trained ones again, bit for bit."""
        try:
            yield self._adapt(demos)
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, self.trained):
                    p.copy_(saved)

    def _adapt(self, demos: TaskDemos) -> int:
        if demos.leave_one_out is None:
            return 0
        batch = demos.leave_one_out
        limit = self.config.finetune_augmentations
        if limit is not None:  # the first `limit` versions only
            keep = demos.version_of_row < limit
            batch = {k: v[keep] for k, v in batch.items()}
        self.adam.reset()
        was_training = self.model.training
        self.model.eval()  # no dropout anywhere, but keep the evaluation numerics
        start, taken = time.perf_counter(), 0
        try:
            for _ in range(self.config.finetune_steps):
                if _out_of_time(start, self.config.time_budget_s):
                    break
                with torch.enable_grad():
                    loss = deep_supervision_loss(self.model, batch)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                self.adam.step([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)])
                taken += 1
        finally:
            self.model.train(was_training)
        return taken


def seconds_per_task(elapsed: float, tasks: int) -> float:
    return elapsed / tasks if tasks else math.nan


class Finetuned:
    """:class:`Finetuner` across the evaluation batches: a task's adapted weights are computed once, when its first
    row arrives, kept in buffers allocated once, and put in place only while its rows are rolled out."""

    def __init__(self, model: EncoderTRM, config: AdaptationConfig) -> None:
        self.tuner = Finetuner(model, config)
        self.adapted = [p.detach().clone() for p in self.tuner.params]
        self.task: int | None = None

    def prepare(self, task: int, demos_of: Callable[[int], TaskDemos]) -> int | None:
        """Adapt to ``task`` unless it is the task already held; the steps taken, or None when it was held."""
        if task == self.task:
            return None
        with self.tuner.adapted(demos_of(task)) as steps, torch.no_grad():
            for buf, p in zip(self.adapted, self.tuner.params):
                buf.copy_(p)
        self.task = task
        return steps

    @contextmanager
    def applied(self) -> Iterator[None]:
        with torch.no_grad():
            for p, buf in zip(self.tuner.params, self.adapted):
                p.copy_(buf)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.tuner.params, self.tuner.trained):
                    p.copy_(saved)


class VotingRun:
    """The votes of one ``trm test`` / ``trm predict``: without adaptation, and with each configured method.

    ``add_batch`` takes the evaluation rows (rows of a task arrive in order, possibly over several batches) and the
    unadapted predictions; for each method it adapts the rows' tasks (once per task, on the task's demos only) and
    rolls their rows out again. Each method has its own :class:`~trm_lightning.evaluation.ARCVoteEvaluator`.
    """

    def __init__(self, model: EncoderTRM, tasks: Sequence, versions: Sequence[int], seed: int,
                 demos_of: Callable[[int, Sequence[int]], TaskDemos], config: AdaptationConfig | None,
                 progress: bool = False) -> None:
        from trm_lightning.evaluation import ARCVoteEvaluator  # evaluation imports nothing of this module

        self.model, self.versions, self.config = model, list(versions), config
        self.methods = list(config.methods) if config is not None else []
        self.evaluators = {m: ARCVoteEvaluator(tasks, seed=seed) for m in [None, *self.methods]}
        self._demos_of = lambda task: demos_of(task, self.versions)
        self._contexts: dict[int, Tensor] = {}  # context method: task -> its adapted contexts (this batch's tasks)
        self._finetuned = Finetuned(model, config) if "finetune" in self.methods else None
        self.seconds = {m: 0.0 for m in self.methods}
        self.tasks_adapted = {m: 0 for m in self.methods}
        self.steps_taken = {m: 0 for m in self.methods}
        self._bar = None
        if progress and self.methods:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(tasks) * len(self.methods), desc="test-time adaptation", unit="task",
                             leave=False, dynamic_ncols=True, mininterval=1.0, disable=None)  # off when not a TTY

    @property
    def final(self):
        """The evaluator of the last method (no adaptation when none is configured): what ``submission.json`` holds."""
        return self.evaluators[self.methods[-1] if self.methods else None]

    def add_batch(self, batch: Mapping[str, Tensor], predictions: Tensor, q_halt: Tensor) -> None:
        keys = (batch["task_index"], batch["query_index"], batch["aug_index"])
        self.evaluators[None].add_batch(*keys, predictions, q_halt)
        for method in self.methods:
            preds, q = self._adapted_rollout(batch, method)
            self.evaluators[method].add_batch(*keys, preds, q)

    def _adapted_rollout(self, batch: Mapping[str, Tensor], method: str) -> tuple[Tensor, Tensor]:
        tasks = batch["task_index"]
        order = list(dict.fromkeys(tasks.tolist()))  # in order of appearance
        predictions = torch.empty_like(batch["inputs"], dtype=torch.long)
        q_halt = torch.empty(tasks.shape[0], device=tasks.device)
        if method == "context":
            self._prepare_contexts(order)
        for task in order:
            rows = (tasks == task).nonzero().squeeze(1)
            part = {k: v[rows] for k, v in batch.items()}
            if method == "finetune":
                start = time.perf_counter()
                with torch.inference_mode(False), torch.enable_grad():
                    steps = self._finetuned.prepare(task, self._demos_of)
                if steps is not None:
                    self._count(method, [steps], time.perf_counter() - start)
            with torch.no_grad():
                if method == "context":
                    slot = {v: i for i, v in enumerate(self.versions)}
                    index = torch.tensor([slot[int(a)] for a in part["aug_index"]], device=rows.device)
                    logits, q, _ = self.model.rollout(part, context=self._contexts[task][index])
                else:
                    with self._finetuned.applied():
                        logits, q, _ = self.model.rollout(part)
            predictions[rows], q_halt[rows] = logits.argmax(-1), q.float()
        return predictions, q_halt

    def _prepare_contexts(self, tasks: list[int]) -> None:
        """Adapt the contexts of ``tasks`` not held yet, ``task_batch`` tasks per batch; keep only these tasks' (the
        rows of a task arrive in order, so a task never comes back once a batch without it has arrived)."""
        self._contexts = {t: c for t, c in self._contexts.items() if t in tasks}
        todo = [t for t in tasks if t not in self._contexts]
        for start in range(0, len(todo), self.config.task_batch):
            group = todo[start : start + self.config.task_batch]
            began = time.perf_counter()
            with torch.inference_mode(False), torch.enable_grad():
                results = adapt_context_group(self.model, [self._demos_of(t) for t in group], self.config)
            for task, (contexts, _) in zip(group, results):
                self._contexts[task] = contexts
            self._count("context", [steps for _, steps in results], time.perf_counter() - began)

    def _count(self, method: str, steps: list[int], seconds: float) -> None:
        self.seconds[method] += seconds
        self.tasks_adapted[method] += len(steps)
        self.steps_taken[method] += sum(steps)
        if self._bar is not None:
            self._bar.update(len(steps))
            self._bar.set_postfix_str(f"{method}: {self.seconds[method] / self.tasks_adapted[method]:.2f} s/task")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def gather(self, strategy) -> None:
        self.close()
        for evaluator in self.evaluators.values():
            evaluator.gather(strategy)
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            totals = torch.tensor([[self.seconds[m], self.tasks_adapted[m], self.steps_taken[m]] for m in self.methods],
                                  dtype=torch.float64).reshape(-1, 3)
            totals = strategy.reduce(totals.to(strategy.root_device), reduce_op="sum").cpu()
            for m, (s, t, k) in zip(self.methods, totals.tolist()):
                self.seconds[m], self.tasks_adapted[m], self.steps_taken[m] = s, int(t), int(k)

    def side_by_side(self, k: int = 2) -> str:
        """``ARC/pass@2 = a/n (no adaptation) -> b/n (context, 32 steps) -> ...`` (call after :meth:`gather`)."""
        from trm_lightning.evaluation import _fmt_count  # the evaluator's own count format
        from trm_lightning.metric_names import pass_at

        parts = []
        for method, evaluator in self.evaluators.items():
            r = evaluator.results()[k]
            label = "no adaptation" if method is None else self.config.label(method)
            parts.append(f"{_fmt_count(r.solved)}/{r.tasks} ({label})")
        return f"{pass_at(k)} = " + " -> ".join(parts)

    def cost(self) -> str:
        """``test-time adaptation: context 77 tasks, 32.0 steps, 0.41 s/task; ...`` (call after :meth:`gather`)."""
        parts = [f"{m} {self.tasks_adapted[m]} tasks, {self.steps_taken[m] / max(1, self.tasks_adapted[m]):.1f} steps, "
                 f"{seconds_per_task(self.seconds[m], self.tasks_adapted[m]):.2f} s/task" for m in self.methods]
        return "test-time adaptation: " + "; ".join(parts)

    def record(self, train_on_eval_demos: bool) -> dict:
        """Each result's protocol and pass@k, and each method's cost, for ``eval_details.json``."""
        out = {}
        for method, evaluator in self.evaluators.items():
            entry = {"protocol": protocol(self.config, method, train_on_eval_demos),
                     "pass_at_k": {str(k): {"solved": r.solved, "tasks": r.tasks, "percent": r.percent,
                                            "wilson_95": list(r.wilson_ci())} for k, r in evaluator.results().items()}}
            if method is not None:
                entry.update(steps_per_task=self.config.steps(method), tasks_adapted=self.tasks_adapted[method],
                             mean_steps_taken=self.steps_taken[method] / max(1, self.tasks_adapted[method]),
                             seconds_per_task=seconds_per_task(self.seconds[method], self.tasks_adapted[method]))
            out["no adaptation" if method is None else method] = entry
        return out
