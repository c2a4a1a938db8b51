"""ARCDataModule: splits, puzzle subsets, the leakage firewall, and the train / val / test loaders."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, default_collate

from trm_lightning.data.arc import ArcTask, load_source
from trm_lightning.data.augment import evaluation_augmentations
from trm_lightning.checks import check_at_least, check_probability
from trm_lightning.data.episodes import (
    EpisodeDataset,
    EpisodeKey,
    EpisodeLoader,
    EpisodeSampler,
    KeyedEpisodes,
    TaskDemos,
    TaskShardSampler,
    query_episodes,
)
from trm_lightning.data.fresh_tasks import FreshTasks, FreshTaskSampler, check_no_training_rule_explains
from trm_lightning.errors import ConfigError
from trm_lightning.vocab import IGNORE_LABEL
from trm_lightning.trainer_state import batches_done_this_epoch


class ARCDataModule(lightning.LightningDataModule):
    """ARC episodes for training and evaluation.

    Training draws ``episodes_per_epoch`` episodes per epoch (a task's demos + one of its test pairs as
    query, under a fresh augmentation). Validation has two views: held-out evaluation tasks (``val``) and
    training tasks under augmentations never drawn in training (``val_seen``). Training tasks that appear
    in the evaluation source, by id or by any identical pair, are dropped (leakage firewall).

    Args:
        train_source: training tasks: a built-in source (``arc1/training``, ``arc1/evaluation``,
            ``arc2/training``, ``arc2/evaluation``) or a path (a directory of task JSON files, a Kaggle
            ``*_challenges.json`` file or a directory of them).
        eval_source: held-out evaluation tasks, same forms as ``train_source``.
        canvas_size: side of the square token canvas; tasks with a larger grid are dropped (ARC needs 30).
        max_demos: demonstration slots per episode; extra demos of a task are left out.
        max_train_puzzles: train on a random subset of this many tasks (after the filters); None for all.
        puzzle_subset_seed: seed of the ``max_train_puzzles`` subset.
        max_eval_puzzles: evaluate on the first this many evaluation tasks by id; None for all.
        global_batch_size: episodes per optimizer step over all devices; divided by the world size.
        eval_batch_size: episodes per validation/test batch per device; None uses the training batch.
        episodes_per_epoch: training episodes per epoch over all devices; None rounds the number of
            training test pairs up to a multiple of ``global_batch_size``.
        num_train_augmentations: training draws augmentation indices in ``0..n-1`` (0 is the original).
        val_augmentations: augmentations per evaluation query (index 0, the original, comes first).
        val_seen_puzzles: training tasks in the ``val_seen`` view; 0 turns it off.
        test_augmentations: the versions of each held-out query that ``trm test`` and ``trm predict`` vote
            over: a count n (the original + n-1 random versions), ``identity``, ``dihedral`` (the 8
            dihedral transforms), ``dihedral_x<k>`` (8 x k: each dihedral under k colour maps) or ``trm``
            (TRM's 1000).
        translate: place training episodes at a random offset on the canvas (not the original version).
        leave_one_out_prob: probability that a training episode uses one of its demos as the query.
        fresh_tasks: train on tasks generated on the fly from the few-shot rule families
            (:class:`~trm_lightning.data.fresh_tasks.FreshTasks`): epoch ``e`` trains on ``episodes_per_epoch`` new
            tasks of the split's training rules, one episode each, never repeated; ``train_source`` then serves
            only ``val_seen``, the diagnostics probe and the puzzle-id table. None: train on ``train_source``.
        train_on_eval_demos: TRM's protocol: also train on the demo pairs of the evaluation tasks (as
            leave-one-out queries; their test outputs stay unread). Held-out scores then measure test-time
            training, not few-shot generalisation; the run prints and records that it is on. The
            puzzle-id baseline needs it to have a vector for the evaluation puzzles.
        num_workers: DataLoader worker processes.
        seed: seed of augmentations, episode sampling and the ``val_seen`` choice.
    """

    def __init__(
        self,
        train_source: str = "arc1/training",
        eval_source: str = "arc1/evaluation",
        canvas_size: int = 30,
        max_demos: int = 10,
        max_train_puzzles: int | None = None,
        puzzle_subset_seed: int = 0,
        max_eval_puzzles: int | None = None,
        global_batch_size: int = 768,
        eval_batch_size: int | None = None,
        episodes_per_epoch: int | None = None,
        num_train_augmentations: int = 1000,
        val_augmentations: int = 1,
        val_seen_puzzles: int = 32,
        test_augmentations: int | str = 8,
        translate: bool = False,
        leave_one_out_prob: float = 0.0,
        fresh_tasks: FreshTasks | None = None,
        train_on_eval_demos: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(fresh_tasks, Mapping):  # a checkpoint's hyperparameters (stored as plain data)
            fresh_tasks = FreshTasks(**fresh_tasks)
        if fresh_tasks is not None:
            fresh_tasks.check()
            if fresh_tasks.max_side > canvas_size:
                raise ConfigError(f"data.fresh_tasks.max_side={fresh_tasks.max_side} does not fit "
                                  f"data.canvas_size={canvas_size}")
            if train_on_eval_demos:
                raise ConfigError("data.fresh_tasks and data.train_on_eval_demos exclude each other: the fresh "
                                  "tasks replace the training episodes, evaluation demos included")
        check_at_least("data.canvas_size", canvas_size, 1)
        check_at_least("data.max_demos", max_demos, 1)
        check_at_least("data.max_train_puzzles", max_train_puzzles, 1, allow_none=True)
        check_at_least("data.max_eval_puzzles", max_eval_puzzles, 0, allow_none=True)
        check_at_least("data.global_batch_size", global_batch_size, 1)
        check_at_least("data.eval_batch_size", eval_batch_size, 1, allow_none=True)
        check_at_least("data.episodes_per_epoch", episodes_per_epoch, 1, allow_none=True)
        check_at_least("data.num_train_augmentations", num_train_augmentations, 1)
        check_at_least("data.val_augmentations", val_augmentations, 1)
        check_at_least("data.val_seen_puzzles", val_seen_puzzles, 0)
        check_probability("data.leave_one_out_prob", leave_one_out_prob)
        check_at_least("data.num_workers", num_workers, 0)
        check_at_least("data.seed", seed, 0)
        check_at_least("data.puzzle_subset_seed", puzzle_subset_seed, 0)
        try:
            self.test_aug_indices = evaluation_augmentations(test_augmentations)
        except ValueError as err:
            raise ConfigError(f"data.test_augmentations: {err}") from None
        self.save_hyperparameters()
        if fresh_tasks is not None:  # plain data in checkpoints (they load with weights_only=True)
            self.hparams["fresh_tasks"] = dataclasses.asdict(fresh_tasks)
        self.fresh_tasks = fresh_tasks
        self.train_source = train_source
        self.eval_source = eval_source
        self.canvas_size = canvas_size
        self.max_demos = max_demos
        self.max_train_puzzles = max_train_puzzles
        self.puzzle_subset_seed = puzzle_subset_seed
        self.max_eval_puzzles = max_eval_puzzles
        self.global_batch_size = global_batch_size
        self.eval_batch_size = eval_batch_size
        self._episodes_per_epoch = episodes_per_epoch
        self.num_train_augmentations = num_train_augmentations
        self.val_augmentations = val_augmentations
        self.val_seen_puzzles = val_seen_puzzles
        self.test_augmentations = test_augmentations
        self.translate = translate
        self.leave_one_out_prob = leave_one_out_prob
        self.train_on_eval_demos = train_on_eval_demos
        self.num_workers = num_workers
        self.seed = seed

        self.train_tasks: list[ArcTask] = []
        self.eval_tasks: list[ArcTask] = []
        self.data_summary: dict[str, Any] = {}
        self._is_set_up = False

    # ------------------------------------------------------------------ sizes the model links to
    @property
    def num_puzzle_ids(self) -> int:
        """Rows of the puzzle-id table: the blank id, then ``num_train_augmentations`` versions of every
        training task (and of every evaluation task with ``train_on_eval_demos``). Loads the tasks."""
        self.setup()
        return 1 + len(self._puzzle_tasks()) * self.num_train_augmentations

    def _puzzle_tasks(self) -> list[ArcTask]:
        """The tasks training reads, in puzzle-id order: training tasks, then (TRM protocol) eval tasks."""
        return self.train_tasks + (self.eval_tasks if self.train_on_eval_demos else [])

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) from the attached Trainer, or (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return int(self.trainer.world_size), int(self.trainer.global_rank)

    @property
    def local_batch_size(self) -> int:
        world, _ = self._world()
        if self.global_batch_size % world:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} does not divide by the world size ({world})"
            )
        return self.global_batch_size // world

    @property
    def episodes_per_epoch(self) -> int:
        """Training episodes per epoch over all ranks (available after :meth:`setup`)."""
        if self._episodes_per_epoch is not None:
            return self._episodes_per_epoch
        self.setup()
        queries = sum(len(task.labelled_test_indices) for task in self.train_tasks)
        return math.ceil(queries / self.global_batch_size) * self.global_batch_size

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self._is_set_up:
            return
        size = self.canvas_size
        summary: dict[str, Any] = {"canvas_size": size}

        train = load_source(self.train_source)
        evaluation = load_source(self.eval_source)
        summary["train_loaded"] = len(train)
        summary["eval_loaded"] = len(evaluation)

        # --- training tasks: canvas, usable episodes, firewall, subset
        fits = [t for t in train if t.max_side <= size]
        summary["train_too_large"] = len(train) - len(fits)
        without_demos = [t for t in fits if not t.train]
        without_query = [t for t in fits if t.train and not t.labelled_test_indices]
        usable = [t for t in fits if t.train and t.labelled_test_indices]
        summary["train_without_demos"] = len(without_demos)
        summary["train_without_query"] = len(without_query)

        eval_ids = {t.task_id for t in evaluation}
        eval_hashes: set[str] = set()
        for task in evaluation:
            eval_hashes |= task.pair_hashes()
        by_id = [t for t in usable if t.task_id in eval_ids]
        by_content = [t for t in usable if t.task_id not in eval_ids and t.pair_hashes() & eval_hashes]
        shared = {t.task_id for t in by_id} | {t.task_id for t in by_content}
        clean = [t for t in usable if t.task_id not in shared]
        summary["train_shared_with_eval"] = len(shared)
        summary["train_shared_by_id"] = len(by_id)
        summary["train_shared_by_content"] = len(by_content)
        summary["train_available"] = len(clean)

        why = (
            f"{summary['train_too_large']} do not fit canvas {size}, {len(without_demos)} without demos"
            + (f", {len(without_query)} without a test output" if without_query else "")
            + f", {len(shared)} shared with eval"
        )
        if self.max_train_puzzles is not None:
            if self.max_train_puzzles > len(clean):
                raise ConfigError(
                    f"max_train_puzzles={self.max_train_puzzles} but only {len(clean)} training tasks fit "
                    f"canvas {size} (after dropping from {self.train_source}: {why})"
                )
            rng = np.random.default_rng(self.puzzle_subset_seed)
            chosen = np.sort(rng.choice(len(clean), size=self.max_train_puzzles, replace=False))
            clean = [clean[i] for i in chosen]
        if not clean:
            raise ConfigError(
                f"no training tasks left from {self.train_source} at canvas {size} ({why}); "
                "use a larger canvas_size or another train_source"
            )
        self.train_tasks = clean
        summary["train_tasks"] = len(clean)

        # --- evaluation tasks: canvas, demos, first N by id
        eval_fits = [t for t in evaluation if t.max_side <= size]
        summary["eval_too_large"] = len(evaluation) - len(eval_fits)
        eval_usable = [t for t in eval_fits if t.train]
        summary["eval_without_demos"] = len(eval_fits) - len(eval_usable)
        if self.max_eval_puzzles is not None:
            eval_usable = eval_usable[: self.max_eval_puzzles]
        self.eval_tasks = eval_usable
        summary["eval_tasks"] = len(eval_usable)
        summary["eval_queries"] = sum(len(t.labelled_test_indices) for t in eval_usable)

        self.data_summary = summary
        subset = (
            f"; using {len(clean)} (max_train_puzzles, seed {self.puzzle_subset_seed})"
            if self.max_train_puzzles is not None
            else ""
        )
        rank_zero_info(f"train: {summary['train_available']} tasks from {self.train_source} ({why}){subset}")
        rank_zero_info(
            f"eval: {len(eval_usable)} tasks from {self.eval_source} ({summary['eval_too_large']} do not fit "
            f"canvas {size}, {summary['eval_without_demos']} without demos"
            + (f"; first {self.max_eval_puzzles} by id" if self.max_eval_puzzles is not None else "")
            + ")"
        )
        if self.fresh_tasks is not None:
            rules = self.fresh_tasks.split()[0]
            check_no_training_rule_explains(eval_usable, rules)
            summary["fresh_tasks"] = len(rules)
            rank_zero_info(f"train: tasks generated on the fly from {len(rules)} training rules of "
                           f"{len(self.fresh_tasks.families)} families (data.fresh_tasks), new ones every epoch; "
                           f"{self.train_source} serves val_seen and the probe")
        summary["train_on_eval_demos"] = self.train_on_eval_demos
        if self.train_on_eval_demos:
            demos = sum(len(t.train) for t in eval_usable)
            rank_zero_warn(
                f"train_on_eval_demos=True (TRM protocol): training also reads the {demos} demo pairs of the "
                f"{len(eval_usable)} evaluation tasks (never their test outputs). Held-out scores of this run "
                "measure test-time training on those tasks, not few-shot generalisation."
            )
        if summary["eval_queries"] == 0:
            rank_zero_warn(
                f"no evaluation episodes from {self.eval_source}: {len(eval_usable)} tasks left at canvas {size}, "
                "none with a known test output; validation and test are empty"
            )
        self._is_set_up = True

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, batch_size: int, loader_class: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        """A DataLoader with its own random generator. Every episode is a pure function of its key, so loading uses
        no randomness; but each iterator a DataLoader creates draws its workers' base seed from its generator, by
        default torch's global one, which training's random draws (ACT exploration) use too. With workers, Lightning
        creates iterators at other moments in a resumed run (the validation loaders' first iterator comes at the
        first validation after the resume) than in an uninterrupted one, so those draws would shift the training
        stream: a loader of its own keeps it the same."""
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = self._world()
        batch_size = self.local_batch_size
        episodes = self.episodes_per_epoch
        if episodes < self.global_batch_size:
            raise ConfigError(
                f"episodes_per_epoch={episodes} is less than global_batch_size={self.global_batch_size}: "
                "an epoch would hold no batch"
            )
        if self.fresh_tasks is not None:
            stream = self.fresh_tasks.stream(episodes, self.seed)
            dataset = EpisodeDataset(stream, self.canvas_size, self.max_demos, seed=self.seed, translate=self.translate)
            sampler = FreshTaskSampler(dataset, stream, episodes, num_replicas=world, rank=rank, seed=self.seed,
                                       num_augmentations=self.num_train_augmentations,
                                       leave_one_out_prob=self.leave_one_out_prob)
            return self._loader(
                dataset, batch_size, EpisodeLoader, sampler=sampler, drop_last=True, progress=self._batches_done
            )
        tasks = self._puzzle_tasks()
        dataset = EpisodeDataset(
            tasks,
            self.canvas_size,
            self.max_demos,
            seed=self.seed,
            translate=self.translate,
            puzzle_id_augmentations=self.num_train_augmentations,
        )
        sampler = EpisodeSampler(
            dataset,
            tasks,
            episodes,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            num_augmentations=self.num_train_augmentations,
            leave_one_out_prob=self.leave_one_out_prob,
            demos_only=[i >= len(self.train_tasks) for i in range(len(tasks))],
        )
        return self._loader(
            dataset, batch_size, EpisodeLoader, sampler=sampler, drop_last=True, progress=self._batches_done
        )

    def _batches_done(self) -> int:
        """Batches of the current epoch whose training step is done (what a checkpoint must not repeat)."""
        if self.trainer is None:
            return 0
        return batches_done_this_epoch(self.trainer)

    def _eval_batch_size(self) -> int:
        return self.eval_batch_size if self.eval_batch_size is not None else self.local_batch_size

    def queries(
        self,
        split: Literal["train", "eval"],
        aug_indices: Sequence[int],
        *,
        task_indices: Iterable[int] | None = None,
        include_unlabelled: bool = False,
    ) -> KeyedEpisodes:
        """The test-pair queries of the training (``split="train"``) or evaluation tasks (``"eval"``) under
        ``aug_indices``, as :func:`~trm_lightning.data.episodes.query_episodes` lists them.

        ``task_indices`` index that split's task list; rows carry the puzzle ids training gave them: a training
        task's versions below ``num_train_augmentations``, an evaluation task's only with
        ``train_on_eval_demos`` (otherwise the blank id 0). Loads the tasks.
        """
        self.setup()
        if split == "train":
            tasks, id_base, id_augmentations = self.train_tasks, 0, self.num_train_augmentations
        elif split == "eval":
            tasks, id_base = self.eval_tasks, len(self.train_tasks)  # in the table, eval tasks follow train tasks
            id_augmentations = self.num_train_augmentations if self.train_on_eval_demos else 0
        else:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return query_episodes(
            tasks,
            self.canvas_size,
            self.max_demos,
            aug_indices,
            seed=self.seed,
            puzzle_id_base=id_base,
            puzzle_id_augmentations=id_augmentations,
            task_indices=task_indices,
            include_unlabelled=include_unlabelled,
        )

    def query_loader(
        self,
        split: Literal["train", "eval"],
        aug_indices: Sequence[int],
        *,
        task_indices: Iterable[int] | None = None,
        include_unlabelled: bool = False,
        shard_tasks: bool = False,
    ) -> DataLoader:
        """:meth:`queries` as an evaluation DataLoader (``eval_batch_size``, in order, every row kept); with
        ``shard_tasks`` under DDP each rank takes whole tasks (:class:`~trm_lightning.data.episodes.TaskShardSampler`)
        instead of Lightning's row-by-row split."""
        episodes = self.queries(
            split, aug_indices, task_indices=task_indices, include_unlabelled=include_unlabelled
        )
        world, rank = self._world()
        if shard_tasks and world > 1:
            return self._loader(episodes, self._eval_batch_size(), sampler=TaskShardSampler(episodes, world, rank))
        return self._loader(episodes, self._eval_batch_size(), shuffle=False)

    def task_demos(self, task_index: int, versions: Sequence[int]) -> TaskDemos:
        """What test-time adaptation reads of evaluation task ``task_index``: its demo pairs only, under each of the
        augmentation indices ``versions`` (a :class:`~trm_lightning.adaptation.TaskDemos`). Never its test outputs:
        the leave-one-out rows' queries are demo pairs, and the one row per version that carries all the demos has
        its query's labels removed."""
        self.setup()
        task = self.eval_tasks[task_index]
        episodes = self.queries("eval", [], task_indices=[task_index]).episodes
        versions = list(versions)
        full = default_collate([episodes[EpisodeKey(task_index, 0, v)] for v in versions])
        full["labels"] = torch.full_like(full["labels"], IGNORE_LABEL)
        if len(task.train) < 2:
            return TaskDemos(None, None, versions, full)
        keys = [EpisodeKey(task_index, i, v, leave_one_out=True) for v in versions for i in range(len(task.train))]
        slots = torch.tensor([j for j in range(len(versions)) for _ in range(len(task.train))])
        return TaskDemos(default_collate([episodes[k] for k in keys]), slots, versions, full)

    def val_seen_task_indices(self) -> list[int]:
        """Indices into ``train_tasks`` of the ``val_seen`` tasks (a fixed choice from ``seed``)."""
        self.setup()
        n = min(self.val_seen_puzzles, len(self.train_tasks))
        rng = np.random.default_rng([self.seed, 0x5EE7])
        return sorted(int(i) for i in rng.choice(len(self.train_tasks), size=n, replace=False))

    def probe_batch(self, num_tasks: int = 16, views: int = 2) -> dict[str, torch.Tensor]:
        """A fixed probe set for representation diagnostics, as one collated batch.

        ``num_tasks`` training tasks (all of them if there are fewer; a fixed choice from ``seed``), each
        with its first labelled test pair as query, in ``views`` augmentations that training never draws
        (indices after the training and ``val_seen`` ones). Row ``v * n + i`` is task ``i`` in view ``v``,
        so the views are aligned row by row.
        """
        self.setup()
        if num_tasks < 1 or views < 1:
            raise ConfigError(f"probe_batch needs num_tasks >= 1 and views >= 1, got {num_tasks} and {views}")
        n = min(num_tasks, len(self.train_tasks))
        rng = np.random.default_rng([self.seed, 0x9B0BE])
        chosen = sorted(int(i) for i in rng.choice(len(self.train_tasks), size=n, replace=False))
        first_aug = self.num_train_augmentations + self.val_augmentations
        dataset = EpisodeDataset(
            self.train_tasks, self.canvas_size, self.max_demos, seed=self.seed, translate=self.translate
        )
        # not query_episodes: one query per task (its first labelled one), view-major, placed as training places
        keys = [
            EpisodeKey(t, self.train_tasks[t].labelled_test_indices[0], first_aug + v)
            for v in range(views)
            for t in chosen
        ]
        return KeyedEpisodes(dataset, keys).batch()

    def val_dataloader(self) -> list[DataLoader]:
        """The ``val`` loader (held-out tasks), then with ``val_seen_puzzles`` the ``val_seen`` one."""
        self.setup()
        loaders = [self.query_loader("eval", range(self.val_augmentations))]
        if self.val_seen_puzzles > 0:  # training tasks under versions training never draws
            unseen = [self.num_train_augmentations + j for j in range(self.val_augmentations)]
            loaders.append(self.query_loader("train", unseen, task_indices=self.val_seen_task_indices()))
        return loaders

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self.query_loader("eval", self.test_aug_indices, shard_tasks=True)

    def predict_dataloader(self) -> DataLoader:
        """Every test input of the evaluation tasks, with or without a known output, under the
        ``test_augmentations`` versions (``trm predict`` writes a submission from their votes)."""
        self.setup()
        return self.query_loader("eval", self.test_aug_indices, include_unlabelled=True, shard_tasks=True)
