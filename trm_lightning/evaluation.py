"""ARC evaluation by augmentation voting, as TRM's evaluator does it (reference trm.md section 6).

For every evaluation row (task, test input, augmentation) the model's canvas prediction is cropped by its
EOS/PAD border (:func:`~trm_lightning.data.tokenize.crop_canvas`), mapped back to the original puzzle's frame
(``augmentation_for(seed, task_id, aug_index).invert``: inverse dihedral, then inverse colour map) and counted
as one vote for that grid, together with the row's ``sigmoid(q_halt)``. For each test input the distinct
grids are ranked by vote count, ties by mean ``sigmoid(q_halt)`` (then by the grid itself, so the order
never depends on the order rows arrived in).

Scores:

- a test input is solved at ``k`` when its true output (shape and values) is among the top ``k`` grids;
- a task scores the fraction of its labelled test inputs solved (an input without any vote is unsolved);
- ``ARC/pass@k`` is the mean over the tasks **evaluated**: the tasks that received at least one vote. A run
  over 32 of 400 tasks divides by 32, never by 400 (the ETRM bug of reference etrm_audit.md section 0).
  Tasks whose test outputs are all unknown are not scored.

Votes never pool across evaluator instances: each ``trm test`` run (each checkpoint) builds a new
:class:`ARCVoteEvaluator`, unlike TRM's default ``aggregated_voting``, which silently added every periodic
evaluation's votes to the previous ones. :meth:`ARCVoteEvaluator.merge` and :meth:`ARCVoteEvaluator.gather`
exist only to combine the ranks of *one* run under DDP; a row ``(task, test input, augmentation)`` counts
once however many ranks or batches saw it (a distributed sampler pads by repeating rows).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from trm_lightning.data.arc import ArcTask, validate_grid
from trm_lightning.data.augment import TRM_NUM_AUGMENTATIONS, Augmentation, augmentation_for, evaluation_augmentations
from trm_lightning.data.tokenize import crop_canvas
from trm_lightning.errors import DataError
from trm_lightning.metric_names import pass_at
from trm_lightning.run_files import EVAL_DETAILS_FILE, SUBMISSION_FILE
from trm_lightning.stats import wilson_interval

DEFAULT_K_VALUES = (1, 2, 5, 10)
_STATE_VERSION = 1
__all__ = ["ARCVoteEvaluator", "PassAtK", "TRM_NUM_AUGMENTATIONS", "evaluation_augmentations", "validate_submission"]

# a distinct predicted grid: (height, width, row-major uint8 bytes); hashable, picklable, and enough to
# rebuild the grid
GridKey = tuple[int, int, bytes]


def _grid_key(grid: np.ndarray) -> GridKey:
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    return (int(grid.shape[0]), int(grid.shape[1]), grid.tobytes())


def _key_grid(key: GridKey) -> np.ndarray:
    height, width, data = key
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width).copy()


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor; bf16/fp16 become float32 first (numpy has no bf16)
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _fmt_count(value: float) -> str:
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.1f}"


@dataclass(frozen=True)
class PassAtK:
    """pass@k of one evaluation.

    Attributes:
        k: candidates allowed per test input.
        solved: sum over the evaluated tasks of the fraction of their test inputs solved.
        tasks: number of tasks evaluated (the denominator).
    """

    k: int
    solved: float
    tasks: int

    @property
    def percent(self) -> float:
        """``100 * solved / tasks``; 0.0 when no task was evaluated."""
        return 100.0 * self.solved / self.tasks if self.tasks else 0.0

    def wilson_ci(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval of ``solved / tasks``, in percent; ``(0.0, 100.0)`` when ``tasks == 0``."""
        lo, hi = wilson_interval(self.solved, self.tasks, z)
        return (100.0 * lo, 100.0 * hi)

    def __str__(self) -> str:
        lo, hi = self.wilson_ci()
        return (
            f"{pass_at(self.k)} = {_fmt_count(self.solved)}/{self.tasks} tasks ({self.percent:.2f}%), "
            f"95% CI [{lo:.1f}%, {hi:.1f}%]"
        )


class ARCVoteEvaluator:
    """Collects the predictions of one evaluation run and scores them by augmentation voting.

    Args:
        tasks: the evaluation tasks; ``task_index`` in :meth:`add_batch` indexes this sequence (the
            datamodule's task list).
        seed: the augmentation seed the episodes were built with (see
            :func:`~trm_lightning.data.augment.augmentation_for`).
        k_values: the k of pass@k, each >= 1.
    """

    def __init__(self, tasks: Sequence[ArcTask], seed: int, k_values: Iterable[int] = DEFAULT_K_VALUES) -> None:
        self.tasks = list(tasks)
        self.seed = int(seed)
        self.k_values = tuple(sorted({int(k) for k in k_values}))
        if not self.k_values or self.k_values[0] < 1:
            raise ValueError(f"k_values must be positive integers, got {tuple(k_values)}")
        ids = [t.task_id for t in self.tasks]
        if len(set(ids)) != len(ids):
            raise ValueError("the evaluation tasks have duplicate task ids")
        digest = hashlib.sha256(repr((self.seed, ids)).encode("utf-8")).hexdigest()
        self._fingerprint = digest[:16]
        # (task, query) -> {aug: (grid key, sigmoid(q_halt))}; the first row seen for a (task, query, aug) wins
        self._rows: dict[tuple[int, int], dict[int, tuple[GridKey, float]]] = {}
        # (task, query) -> {grid key: the same key}: one object per distinct grid, shared by its rows (and by
        # pickle's memo, so a gathered state carries each distinct grid once)
        self._interned: dict[tuple[int, int], dict[GridKey, GridKey]] = {}
        self._augs: dict[tuple[int, int], Augmentation] = {}
        self._ranked: dict[tuple[int, int], list[tuple[GridKey, int, float]]] = {}

    # ------------------------------------------------------------------------------------------ adding
    def __len__(self) -> int:
        """Distinct (task, test input, augmentation) rows collected."""
        return sum(len(rows) for rows in self._rows.values())

    @property
    def evaluated_task_indices(self) -> list[int]:
        """Indices of the tasks with at least one vote, sorted."""
        return sorted({t for (t, _), rows in self._rows.items() if rows})

    def _augmentation(self, task_index: int, aug_index: int) -> Augmentation:
        key = (task_index, aug_index)
        aug = self._augs.get(key)
        if aug is None:
            aug = augmentation_for(self.seed, self.tasks[task_index].task_id, aug_index)
            self._augs[key] = aug
        return aug

    def _check_row(self, task_index: int, query_index: int, aug_index: int) -> None:
        if not 0 <= task_index < len(self.tasks):
            raise ValueError(f"task_index {task_index} is outside 0..{len(self.tasks) - 1}")
        task = self.tasks[task_index]
        if not 0 <= query_index < len(task.test):
            raise ValueError(
                f"task '{task.task_id}' has {len(task.test)} test input(s); query_index {query_index} is out of range"
            )
        if aug_index < 0:
            raise ValueError(f"aug_index must be >= 0, got {aug_index}")

    def _add_row(self, task_index: int, query_index: int, aug_index: int, key: GridKey, q: float) -> bool:
        rows = self._rows.setdefault((task_index, query_index), {})
        if aug_index in rows:
            return False
        interned = self._interned.setdefault((task_index, query_index), {})
        key = interned.setdefault(key, key)
        rows[aug_index] = (key, float(q))
        self._ranked.pop((task_index, query_index), None)
        return True

    def add_batch(self, task_index, query_index, aug_index, predictions, q_halt_logits) -> None:
        """Add one batch of evaluation rows.

        Args:
            task_index: (B,) indices into ``tasks``.
            query_index: (B,) test input of each row.
            aug_index: (B,) augmentation of each row.
            predictions: (B, S*S) predicted canvas tokens (argmax of the last ACT step).
            q_halt_logits: (B,) halting logits; the vote weight for ties is their sigmoid.

        A row whose (task, test input, augmentation) was already added is ignored.
        """
        tasks = _to_numpy(task_index).reshape(-1).astype(np.int64)
        queries = _to_numpy(query_index).reshape(-1).astype(np.int64)
        augs = _to_numpy(aug_index).reshape(-1).astype(np.int64)
        preds = _to_numpy(predictions)
        qs = _to_numpy(q_halt_logits).reshape(-1).astype(np.float64)
        n = tasks.shape[0]
        if preds.ndim < 2:
            raise ValueError(f"add_batch: predictions must be (B, S*S) canvas tokens, got shape {preds.shape}")
        preds = preds.reshape(preds.shape[0], -1)
        if not (queries.shape[0] == augs.shape[0] == qs.shape[0] == preds.shape[0] == n):
            raise ValueError(
                "add_batch: task_index, query_index, aug_index, predictions and q_halt_logits must have the same "
                f"number of rows, got {n}, {queries.shape[0]}, {augs.shape[0]}, {preds.shape[0]}, {qs.shape[0]}"
            )
        for i in range(n):  # check the whole batch before adding any of it
            self._check_row(int(tasks[i]), int(queries[i]), int(augs[i]))
        for i in range(n):
            t, q, a = int(tasks[i]), int(queries[i]), int(augs[i])
            if a in self._rows.get((t, q), ()):
                continue  # a repeated row (DDP padding): counts once
            grid = self._augmentation(t, a).invert(crop_canvas(preds[i]))
            self._add_row(t, q, a, _grid_key(grid), _sigmoid(float(qs[i])))

    # ------------------------------------------------------------------------------------- distributed
    def state(self) -> dict:
        """The collected rows as plain picklable data, for gathering across the ranks of one run."""
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint,
            "rows": {tq: dict(rows) for tq, rows in self._rows.items()},
        }

    def merge(self, states: Sequence[dict]) -> None:
        """Merge gathered :meth:`state` dicts of the same run (this instance's own state may be among them).

        Rows are deduplicated by (task, test input, augmentation), so merging a state twice changes nothing.

        Raises:
            ValueError: a state from another task list or seed (votes never pool across evaluations).
        """
        for i, state in enumerate(states):
            if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
                raise ValueError(f"merge: state {i} is not an ARCVoteEvaluator state")
            if state.get("fingerprint") != self._fingerprint:
                raise ValueError(
                    f"merge: state {i} comes from an evaluator with other tasks or another seed; votes of different "
                    "evaluations are never pooled"
                )
            for (t, q), rows in state["rows"].items():
                self._check_row(int(t), int(q), 0)
                for a, (key, sq) in rows.items():
                    self._add_row(int(t), int(q), int(a), (int(key[0]), int(key[1]), bytes(key[2])), float(sq))

    def gather(self, strategy_or_none=None) -> None:
        """Under ``torch.distributed`` with several ranks, all-gather every rank's state once and merge it.

        Every rank must call this (it is a collective); afterwards each rank holds all the votes. A no-op in a
        single process. ``strategy_or_none`` is the Lightning strategy (its ``world_size`` is checked) or None.
        """
        world_size = getattr(strategy_or_none, "world_size", None) if strategy_or_none is not None else None
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialised else 1
        if world_size <= 1:
            return
        if not initialised:
            raise RuntimeError(f"gather: world size {world_size} but torch.distributed is not initialised")
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.state())
        self.merge(gathered)

    # ----------------------------------------------------------------------------------------- scoring
    def _ranked_keys(self, task_index: int, query_index: int) -> list[tuple[GridKey, int, float]]:
        cached = self._ranked.get((task_index, query_index))
        if cached is not None:
            return cached
        votes: dict[GridKey, list[float]] = {}
        for key, sq in self._rows.get((task_index, query_index), {}).values():
            votes.setdefault(key, []).append(sq)
        # fsum is exactly rounded, so the mean does not depend on the order rows arrived in
        ranked = [(key, len(qs), math.fsum(qs) / len(qs)) for key, qs in votes.items()]
        ranked.sort(key=lambda item: (-item[1], -item[2], item[0]))
        self._ranked[(task_index, query_index)] = ranked
        return ranked

    def ranked(self, task_index: int, query_index: int) -> list[tuple[np.ndarray, int, float]]:
        """Distinct predicted grids of one test input as ``(grid, count, mean sigmoid(q_halt))``, best first.

        Sorted by count, then mean q, descending (then by the grid, for a deterministic order). Empty when
        the input got no vote. A prediction without a readable grid crops to a ``(0, 0)`` grid and votes too.
        """
        return [(_key_grid(key), count, mean_q) for key, count, mean_q in self._ranked_keys(task_index, query_index)]

    def _solved_rank(self, task_index: int, query_index: int) -> int | None:
        """1-based rank of the true output among the candidates, None if absent or unknown."""
        target = self.tasks[task_index].test[query_index][1]
        if target is None:
            return None
        target_key = _grid_key(target)
        for rank, (key, _, _) in enumerate(self._ranked_keys(task_index, query_index), start=1):
            if key == target_key:
                return rank
        return None

    def _scored_tasks(self) -> list[int]:
        return [t for t in self.evaluated_task_indices if self.tasks[t].labelled_test_indices]

    def results(self) -> dict[int, PassAtK]:
        """pass@k for every k: the denominator is the number of tasks evaluated (with at least one vote)."""
        solved = {k: Fraction(0) for k in self.k_values}
        scored = self._scored_tasks()
        for t in scored:
            labelled = self.tasks[t].labelled_test_indices
            ranks = [self._solved_rank(t, q) for q in labelled]
            for k in self.k_values:
                hits = sum(1 for r in ranks if r is not None and r <= k)
                solved[k] += Fraction(hits, len(labelled))
        return {k: PassAtK(k=k, solved=float(solved[k]), tasks=len(scored)) for k in self.k_values}

    def _attempts(self, task_index: int, query_index: int) -> dict[str, list[list[int]]]:
        grids = [key for key, _, _ in self._ranked_keys(task_index, query_index) if key[0] > 0 and key[1] > 0]
        if not grids:
            first, second = [[0]], [[0]]
        else:
            first = _key_grid(grids[0]).tolist()
            second = _key_grid(grids[1 if len(grids) > 1 else 0]).tolist()
        return {"attempt_1": first, "attempt_2": second}

    def submission(self) -> dict:
        """Kaggle submission: ``{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}``, one entry per test
        input in order, for every task given to the evaluator.

        The attempts are the two best non-empty candidates; ``attempt_2`` repeats ``attempt_1`` when there is
        only one, and an input without a candidate (for example a task not evaluated) gets ``[[0]]`` twice.
        """
        return {
            task.task_id: [self._attempts(t, q) for q in range(len(task.test))] for t, task in enumerate(self.tasks)
        }

    def details(self, top: int | None = None) -> list[dict]:
        """Per evaluated task: id, score at each k, and per test input its top candidates and solved@k.

        Args:
            top: candidates listed per test input (default: the largest k).
        """
        top = max(self.k_values) if top is None else int(top)
        out = []
        for t in self.evaluated_task_indices:
            task = self.tasks[t]
            inputs = []
            for q in range(len(task.test)):
                ranked = self._ranked_keys(t, q)
                target = task.test[q][1]
                rank = self._solved_rank(t, q)
                inputs.append(
                    {
                        "test_index": q,
                        "votes": sum(count for _, count, _ in ranked),
                        "candidates_total": len(ranked),
                        "labelled": target is not None,
                        "correct_rank": rank,
                        "solved": {str(k): (rank is not None and rank <= k) for k in self.k_values}
                        if target is not None
                        else None,
                        "candidates": [
                            {
                                "grid": _key_grid(key).tolist(),
                                "count": count,
                                "mean_q": mean_q,
                                "correct": None if target is None else key == _grid_key(target),
                            }
                            for key, count, mean_q in ranked[:top]
                        ],
                    }
                )
            labelled = task.labelled_test_indices
            score = None
            if labelled:
                score = {
                    str(k): sum(1 for i in labelled if inputs[i]["solved"][str(k)]) / len(labelled)
                    for k in self.k_values
                }
            out.append({"task_id": task.task_id, "task_index": t, "score": score, "test_inputs": inputs})
        return out

    def write(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, Path]:
        """Write ``submission.json`` and ``eval_details.json`` into ``directory`` (created if needed); ``extra`` adds
        top-level fields to the details (the protocol, the test-time adaptation results).

        Returns:
            ``{"submission": path, "details": path}``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        submission = self.submission()
        validate_submission(submission, self.tasks)
        results = self.results()
        details = {
            "seed": self.seed,
            "tasks_defined": len(self.tasks),
            "tasks_evaluated": len(self._scored_tasks()),
            "rows": len(self),
            "pass_at_k": {
                str(k): {
                    "solved": r.solved,
                    "tasks": r.tasks,
                    "percent": r.percent,
                    "wilson_95": list(r.wilson_ci()),
                    "summary": str(r),
                }
                for k, r in results.items()
            },
            **(extra or {}),
            "tasks": self.details(),
        }
        paths = {"submission": directory / SUBMISSION_FILE, "details": directory / EVAL_DETAILS_FILE}
        for name, payload in (("submission", submission), ("details", details)):
            tmp = paths[name].with_name(paths[name].name + ".tmp")
            tmp.write_text(json.dumps(payload, separators=(",", ":") if name == "submission" else None, indent=None))
            os.replace(tmp, paths[name])
        return paths


def validate_submission(obj: Any, tasks: Sequence[ArcTask]) -> None:
    """Check the Kaggle ARC submission structure.

    Every task must be present (and no other), each with a list of one entry per test input, each entry an
    object with exactly ``attempt_1`` and ``attempt_2``, each a grid that the task loader would accept
    (:func:`~trm_lightning.data.arc.validate_grid`: a rectangular list of rows of integers 0..9, 1..30 per side).

    Raises:
        ValueError: naming the task, the test input and the attempt that is wrong.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"submission: expected an object keyed by task id, got {type(obj).__name__}")
    expected = {task.task_id: task for task in tasks}
    missing = [tid for tid in expected if tid not in obj]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"submission: missing task(s) {', '.join(missing[:5])}{more}")
    unknown = [str(tid) for tid in obj if tid not in expected]
    if unknown:
        raise ValueError(f"submission: unknown task(s) {', '.join(unknown[:5])}")
    for tid, task in expected.items():
        entries = obj[tid]
        if not isinstance(entries, list):
            raise ValueError(f"submission: task '{tid}': expected a list of test inputs, got {type(entries).__name__}")
        if len(entries) != len(task.test):
            raise ValueError(
                f"submission: task '{tid}': {len(entries)} entries but the task has {len(task.test)} test input(s)"
            )
        for q, entry in enumerate(entries):
            where = f"submission: task '{tid}' test input {q}"
            wanted = {"attempt_1", "attempt_2"}
            if not isinstance(entry, dict):
                got = type(entry).__name__
                raise ValueError(f"{where}: expected an object with attempt_1 and attempt_2, got {got}")
            keys = set(entry)
            if keys != wanted:
                problems = []
                if wanted - keys:
                    problems.append(f"missing {', '.join(sorted(wanted - keys))}")
                if keys - wanted:
                    problems.append(f"unexpected {', '.join(sorted(map(str, keys - wanted)))}")
                raise ValueError(f"{where}: {'; '.join(problems)}")
            for attempt in ("attempt_1", "attempt_2"):
                try:
                    validate_grid(entry[attempt], f"{where} {attempt}")
                except DataError as err:  # the loader's grid rules and wording, raised as this function's error
                    raise ValueError(str(err)) from None
