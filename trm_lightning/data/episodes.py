"""Episodes: K demonstration pairs + one query pair of one puzzle version, as canvas tensors.

An episode is named by an :class:`EpisodeKey` (task, query pair, augmentation). The dataset builds the
tensors on the fly from that key, so there is nothing precomputed; :class:`EpisodeSampler` decides which
keys an epoch visits (deterministically from ``(seed, epoch)``, split across ranks), and
:func:`eval_keys` lists the fixed keys of an evaluation (:func:`query_episodes`: those episodes as a dataset).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from trm_lightning.data.arc import ArcTask
from trm_lightning.data.augment import augmentation_for, translation_for
from trm_lightning.checks import check_at_least, check_probability
from trm_lightning.data.tokenize import canvas_labels, grid_to_canvas
from trm_lightning.errors import ConfigError, DataError
from trm_lightning.vocab import IGNORE_LABEL, PAD


class TaskStream(ABC):
    """Marks a task sequence made on demand (:class:`~trm_lightning.data.fewshot_rules.RuleTaskStream`): item ``g``
    is task ``g``, a pure function of the stream's seed and ``g``, generated when indexed; ``len`` is the tasks one
    epoch visits. An :class:`EpisodeDataset` keeps a stream as it is (a list would be materialised)."""

    @abstractmethod
    def __len__(self) -> int:
        """The tasks one epoch visits."""

    @abstractmethod
    def __getitem__(self, index: int) -> ArcTask:
        """Task ``index``, generated now."""


@dataclass(frozen=True)
class EpisodeKey:
    """Which episode to build.

    Attributes:
        task_index: index into the dataset's task list.
        query_index: the query pair: a test pair, or with ``leave_one_out`` a train pair.
        aug_index: augmentation number (0 = the original puzzle), see :func:`augmentation_for`.
        leave_one_out: query = train pair ``query_index``, demos = the other train pairs.
    """

    task_index: int
    query_index: int
    aug_index: int
    leave_one_out: bool = False


class EpisodeDataset(Dataset):
    """Map-style dataset indexed by :class:`EpisodeKey` (an int ``i`` means ``EpisodeKey(i, 0, 0)``).

    Each item is a dict of tensors (``S = canvas_size``, ``K = max_demos``):

    - ``demo_inputs``, ``demo_outputs``: int32 ``[K, S*S]``, unused slots all PAD;
    - ``demo_mask``: bool ``[K]``, True for the slots that hold a demo;
    - ``inputs``: int32 ``[S*S]``; ``labels``: int64 ``[S*S]``, -100 at PAD (all -100 when the answer is
      unknown);
    - ``task_index``, ``aug_index``, ``query_index``: int64 scalars;
    - ``puzzle_id``: int64 scalar, the puzzle-id baseline's row for this puzzle version:
      ``1 + (puzzle_id_base + task_index) * puzzle_id_augmentations + aug_index`` when
      ``aug_index < puzzle_id_augmentations``, else 0 (the blank id: a version the table never trains).

    Args:
        tasks: the tasks; ``task_index`` indexes this sequence.
        canvas_size: side of the square canvas.
        max_demos: demo slots per episode; a task with more demos keeps the first ``max_demos``.
        seed: augmentation seed (see :func:`augmentation_for`).
        translate: place each augmented episode (``aug_index != 0``) at a random offset, one per episode.
        puzzle_id_base: task slot of ``task_index`` 0 in the puzzle-id space (the evaluation tasks follow
            the training tasks when both are in the table).
        puzzle_id_augmentations: augmentation versions per task in the puzzle-id space; 0 gives every
            episode the blank id 0.
    """

    def __init__(
        self,
        tasks: Sequence[ArcTask],
        canvas_size: int,
        max_demos: int,
        seed: int = 0,
        translate: bool = False,
        puzzle_id_base: int = 0,
        puzzle_id_augmentations: int = 0,
    ) -> None:
        check_at_least("canvas_size", canvas_size, 1)
        check_at_least("max_demos", max_demos, 1)
        self.tasks = tasks if isinstance(tasks, TaskStream) else list(tasks)
        self.canvas_size = canvas_size
        self.max_demos = max_demos
        self.seed = seed
        self.translate = translate
        self.puzzle_id_base = puzzle_id_base
        self.puzzle_id_augmentations = puzzle_id_augmentations

    def puzzle_id(self, task_index: int, aug_index: int) -> int:
        """The puzzle-id row of (task, augmentation), 0 when the table does not hold it."""
        n = self.puzzle_id_augmentations
        if not 0 <= aug_index < n:
            return 0
        return 1 + (self.puzzle_id_base + task_index) * n + aug_index

    def __len__(self) -> int:
        return len(self.tasks)

    def _pairs(self, key: EpisodeKey) -> tuple[ArcTask, list, tuple]:
        task = self.tasks[key.task_index]
        if key.leave_one_out:
            if not 0 <= key.query_index < len(task.train):
                raise IndexError(f"task '{task.task_id}' has no train pair {key.query_index}")
            query = task.train[key.query_index]
            demos = [p for i, p in enumerate(task.train) if i != key.query_index]
        else:
            if not 0 <= key.query_index < len(task.test):
                raise IndexError(f"task '{task.task_id}' has no test pair {key.query_index}")
            query = task.test[key.query_index]
            demos = list(task.train)
        return task, demos[: self.max_demos], query

    def __getitem__(self, key: EpisodeKey | int) -> dict[str, torch.Tensor]:
        if not isinstance(key, EpisodeKey):
            key = EpisodeKey(int(key), 0, 0)
        task, demos, (query_in, query_out) = self._pairs(key)
        aug = augmentation_for(self.seed, task.task_id, key.aug_index)

        demo_grids = [(aug.apply(i), aug.apply(o)) for i, o in demos]
        query_in = aug.apply(query_in)
        query_out = aug.apply(query_out) if query_out is not None else None

        size = self.canvas_size
        offset = (0, 0)
        if self.translate and key.aug_index != 0:
            grids = [g for pair in demo_grids for g in pair] + [query_in]
            if query_out is not None:
                grids.append(query_out)
            max_h = max(g.shape[0] for g in grids)
            max_w = max(g.shape[1] for g in grids)
            if max_h <= size and max_w <= size:
                offset = translation_for(self.seed, task.task_id, key.aug_index, max_h, max_w, size)

        def canvas(grid: np.ndarray, what: str) -> np.ndarray:
            try:
                return grid_to_canvas(grid, size, offset)
            except ValueError:
                raise DataError(
                    f"{task.source}: task '{task.task_id}' {what}: a {grid.shape[0]}x{grid.shape[1]} grid "
                    f"does not fit canvas {size}"
                ) from None

        n_cells = size * size
        demo_inputs = np.full((self.max_demos, n_cells), PAD, dtype=np.int32)
        demo_outputs = np.full((self.max_demos, n_cells), PAD, dtype=np.int32)
        demo_mask = np.zeros(self.max_demos, dtype=bool)
        for slot, (inp, out) in enumerate(demo_grids):
            demo_inputs[slot] = canvas(inp, f"demo {slot} input")
            demo_outputs[slot] = canvas(out, f"demo {slot} output")
            demo_mask[slot] = True

        inputs = canvas(query_in, "query input").astype(np.int32)
        if query_out is None:
            labels = np.full(n_cells, IGNORE_LABEL, dtype=np.int64)
        else:
            labels = canvas_labels(canvas(query_out, "query output"))

        return {
            "demo_inputs": torch.from_numpy(demo_inputs),
            "demo_outputs": torch.from_numpy(demo_outputs),
            "demo_mask": torch.from_numpy(demo_mask),
            "inputs": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "task_index": torch.tensor(key.task_index, dtype=torch.int64),
            "aug_index": torch.tensor(key.aug_index, dtype=torch.int64),
            "query_index": torch.tensor(key.query_index, dtype=torch.int64),
            "puzzle_id": torch.tensor(self.puzzle_id(key.task_index, key.aug_index), dtype=torch.int64),
        }


class EpisodeSampler(DistributedSampler):
    """Training episodes of one epoch, deterministic given ``(seed, epoch)`` and split across ranks.

    It subclasses :class:`~torch.utils.data.DistributedSampler` on purpose: Lightning then neither wraps
    it in its own distributed sampler nor replaces it, and calls :meth:`set_epoch` every epoch.

    The global list of ``episodes_per_epoch`` keys is drawn with ``np.random.default_rng([seed, epoch])``:
    tasks in the order of concatenated random permutations (every task equally often), each with a random
    query (a test pair with a known output, or with probability ``leave_one_out_prob`` and at least two
    train pairs a random train pair as leave-one-out query) and a random augmentation in
    ``0..num_augmentations - 1``. Rank ``r`` takes ``keys[r::num_replicas]``, cut to
    ``episodes_per_epoch // num_replicas`` so every rank yields the same number.

    Args:
        dataset: the :class:`EpisodeDataset` the keys are for.
        tasks: the same tasks as the dataset (their train/test pairs decide the queries).
        episodes_per_epoch: episodes per epoch over all ranks.
        num_replicas: world size.
        rank: this process's global rank.
        seed: sampling seed.
        num_augmentations: augmentation indices are drawn from ``0..num_augmentations - 1``.
        leave_one_out_prob: probability of a leave-one-out episode (tasks with >= 2 train pairs).
        demos_only: per task, True when only its demo pairs may be used (TRM's protocol for evaluation
            tasks): its episodes are always leave-one-out, its test outputs never read.
    """

    def __init__(
        self,
        dataset: Dataset,
        tasks: Sequence[ArcTask],
        episodes_per_epoch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_augmentations: int = 1000,
        leave_one_out_prob: float = 0.0,
        demos_only: Sequence[bool] | None = None,
    ) -> None:
        self._init_epochs(dataset, episodes_per_epoch, num_replicas, rank, seed, num_augmentations, leave_one_out_prob)
        if not tasks:
            raise ConfigError("EpisodeSampler needs at least one task")
        self.tasks = list(tasks)
        self._demos_only = [False] * len(self.tasks) if demos_only is None else [bool(d) for d in demos_only]
        if len(self._demos_only) != len(self.tasks):
            raise ConfigError(f"demos_only has {len(self._demos_only)} entries for {len(self.tasks)} tasks")
        self._labelled = [task.labelled_test_indices for task in self.tasks]
        for task, labelled, only in zip(self.tasks, self._labelled, self._demos_only):
            if only and not task.train:
                raise DataError(f"{task.source}: task '{task.task_id}' has no demo pair to train on")
            if not labelled and not only:
                raise DataError(f"{task.source}: task '{task.task_id}' has no test pair with a known output")
        self._n_train = np.array([len(task.train) for task in self.tasks])

    def _init_epochs(
        self, dataset: Dataset, episodes_per_epoch: int, num_replicas: int, rank: int, seed: int,
        num_augmentations: int, leave_one_out_prob: float,
    ) -> None:
        """What every epoch-keyed sampler holds: the checked arguments, DistributedSampler's state and the resume
        offset (shared with :class:`~trm_lightning.data.fresh_tasks.FreshTaskSampler`)."""
        check_at_least("num_replicas", num_replicas, 1)
        if episodes_per_epoch < num_replicas:
            raise ConfigError(
                f"episodes_per_epoch={episodes_per_epoch} is less than the number of ranks ({num_replicas})"
            )
        check_at_least("num_augmentations", num_augmentations, 1)
        check_probability("leave_one_out_prob", leave_one_out_prob)
        check_at_least("seed", seed, 0)
        DistributedSampler.__init__(
            self, dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.episodes_per_epoch = episodes_per_epoch
        self.num_augmentations = num_augmentations
        self.leave_one_out_prob = leave_one_out_prob
        # what DistributedSampler's other methods read
        self.num_samples = episodes_per_epoch // num_replicas
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, episodes of it already trained on, this rank)

    def resume_at(self, epoch: int, episodes_done: int) -> None:
        """Iterations of ``epoch`` start after its first ``episodes_done`` keys (a mid-epoch resume), until the
        sampler moves to another epoch."""
        if not 0 <= episodes_done <= self.num_samples:
            raise ValueError(f"episodes_done={episodes_done} is outside 0..{self.num_samples}")
        self._resume = (epoch, episodes_done)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; a resume offset of another epoch no longer applies."""
        super().set_epoch(epoch)
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    def __len__(self) -> int:
        return self.num_samples

    def global_keys(self, epoch: int | None = None) -> list[EpisodeKey]:
        """The keys of every rank for ``epoch`` (default: the current epoch), before the split."""
        epoch = self.epoch if epoch is None else epoch
        n, n_tasks = self.episodes_per_epoch, len(self.tasks)
        rng = np.random.default_rng([self.seed, epoch])
        rounds = math.ceil(n / n_tasks)
        order = np.concatenate([rng.permutation(n_tasks) for _ in range(rounds)])[:n]
        loo_draw = rng.random(n)
        pair_draw = rng.random(n)
        augs = rng.integers(0, self.num_augmentations, size=n)

        keys = []
        for task_index, loo_u, pair_u, aug in zip(order.tolist(), loo_draw, pair_draw, augs.tolist()):
            n_train = int(self._n_train[task_index])
            if self._demos_only[task_index]:
                keys.append(EpisodeKey(task_index, min(int(pair_u * n_train), n_train - 1), aug, True))
            elif n_train >= 2 and loo_u < self.leave_one_out_prob:
                keys.append(EpisodeKey(task_index, min(int(pair_u * n_train), n_train - 1), aug, True))
            else:
                labelled = self._labelled[task_index]
                query = labelled[min(int(pair_u * len(labelled)), len(labelled) - 1)]
                keys.append(EpisodeKey(task_index, query, aug, False))
        return keys

    def __iter__(self) -> Iterator[EpisodeKey]:
        """This rank's keys of the current epoch, after the resume offset of this epoch if there is one.

        A pure function of (epoch, resume offset): iterating twice gives the same keys, so an iterator created
        early (data workers draw their first keys when the loader's iterator is made) and one created later agree.
        """
        keys = self.global_keys()[self.rank :: self.num_replicas][: self.num_samples]
        if self._resume is not None and self._resume[0] == self.epoch:
            keys = keys[self._resume[1] :]
        return iter(keys)


class EpisodeLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch through Lightning's ``state_dict``/``load_state_dict``.

    Lightning saves the state with every checkpoint and loads it before it iterates again; the state is
    the sampler's epoch and the batches already trained on in it (``progress()``, read from the Trainer
    at save time, not from this loader or its workers, which prefetch ahead). On resume, the sampler moves to
    that epoch and skips them, so the run sees exactly the batches an uninterrupted run would have seen, with or
    without data workers.

    Args:
        progress: returns the number of batches of the current epoch whose optimizer step is done.
        *args, **kwargs: as for :class:`~torch.utils.data.DataLoader` (the sampler must be an
            :class:`EpisodeSampler`).
    """

    def __init__(self, *args, progress: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpisodeSampler):
            raise TypeError("EpisodeLoader needs an EpisodeSampler")
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume inside the saved epoch. The epoch is set here, not left to Lightning's ``set_epoch``: on a resume
        Lightning creates the one iterator of that epoch right after this call and before it sets the epoch, and
        with data workers that iterator draws its keys from the sampler at once."""
        epoch = int(state["epoch"])
        batches = min(int(state["batches"]), len(self))
        self.sampler.set_epoch(epoch)
        self.sampler.resume_at(epoch, batches * int(self.batch_size))


class TaskShardSampler(DistributedSampler):
    """The evaluation rows of whole tasks per rank (task ``t`` on rank ``t % num_replicas``), in their order.

    Lightning's default for evaluation under DDP splits rows round-robin, so every rank sees every task; with
    test-time adaptation each rank would then adapt every task. Whole tasks per rank adapt each task once, in
    parallel. (A subclass of DistributedSampler, so Lightning keeps it.)
    """

    def __init__(self, dataset: KeyedEpisodes, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = [i for i, key in enumerate(dataset.keys) if key.task_index % num_replicas == rank]
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class KeyedEpisodes(Dataset):
    """A fixed list of episodes (evaluation): item ``i`` is ``episodes[keys[i]]``."""

    def __init__(self, episodes: EpisodeDataset, keys: Sequence[EpisodeKey]) -> None:
        self.episodes = episodes
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.episodes[self.keys[i]]

    def batch(self, rows: int | None = None) -> dict[str, torch.Tensor]:
        """The first ``rows`` items (all of them by default) collated into one batch, in order."""
        keys = self.keys[:rows]
        if not keys:
            raise ValueError("no episodes to batch")
        return default_collate([self.episodes[key] for key in keys])


def eval_keys(
    tasks: Sequence[ArcTask], aug_indices: Sequence[int], *, include_unlabelled: bool = False
) -> list[EpisodeKey]:
    """Keys for every task x test pair (with a known output, unless ``include_unlabelled``) x aug index.

    Ordered task by task, then test pair, then augmentation.
    """
    aug_indices = list(aug_indices)
    keys = []
    for task_index, task in enumerate(tasks):
        for query_index, (_, output) in enumerate(task.test):
            if output is None and not include_unlabelled:
                continue
            keys.extend(EpisodeKey(task_index, query_index, aug) for aug in aug_indices)
    return keys


def query_episodes(
    tasks: Sequence[ArcTask],
    canvas_size: int,
    max_demos: int,
    aug_indices: Sequence[int],
    *,
    seed: int = 0,
    puzzle_id_base: int = 0,
    puzzle_id_augmentations: int = 0,
    task_indices: Iterable[int] | None = None,
    include_unlabelled: bool = False,
) -> KeyedEpisodes:
    """The test-pair queries of ``tasks`` under ``aug_indices``: the fixed episodes of an evaluation.

    Keys as :func:`eval_keys` lists them (task, test pair, augmentation); with ``task_indices`` only those
    tasks' keys, still indexing the whole ``tasks`` (so puzzle ids and the evaluator's task indices do not
    move). Episodes are never translated; the other arguments are :class:`EpisodeDataset`'s.
    """
    dataset = EpisodeDataset(
        tasks,
        canvas_size,
        max_demos,
        seed=seed,
        puzzle_id_base=puzzle_id_base,
        puzzle_id_augmentations=puzzle_id_augmentations,
    )
    keys = eval_keys(tasks, aug_indices, include_unlabelled=include_unlabelled)
    if task_indices is not None:
        chosen = set(task_indices)
        keys = [key for key in keys if key.task_index in chosen]
    return KeyedEpisodes(dataset, keys)


@dataclass
class TaskDemos:
    """What adapting one evaluation task reads: only its demo pairs.

    Attributes:
        leave_one_out: a batch of every demo pair as the query (the others as demos), under each version, rows
            ordered version by version; None when the task has fewer than two demos (nothing to learn from).
        version_of_row: (rows,) the position in ``versions`` of each leave-one-out row.
        versions: the augmentation indices adapted (one context each for ``context``).
        full: one row per version with all the demos (its query is irrelevant: only the demos are read).
    """

    leave_one_out: dict[str, torch.Tensor] | None
    version_of_row: torch.Tensor | None
    versions: list[int]
    full: dict[str, torch.Tensor]
