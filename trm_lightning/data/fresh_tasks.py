"""Training on tasks generated on the fly (``data.fresh_tasks``): every epoch a new set of tasks, none repeated.

The memorisation shortcut of meta-learning needs repeats: a task seen many times can be answered from its query
alone. With ``data.fresh_tasks`` the training episodes come from a :class:`~trm_lightning.data.fewshot_rules.
RuleTaskStream` over the *training* rules of the few-shot split instead of ``data.train_source``: epoch ``e`` visits
tasks ``e * E .. (e + 1) * E - 1`` of the stream (``E = data.episodes_per_epoch``), one episode each, so no task is
ever trained on twice. Task ``g`` is a pure function of ``(data.seed, g)`` and the epoch's keys a pure function of
``(data.seed, e)``, so a resumed run sees exactly the tasks an uninterrupted one would (with or without workers).

``data.train_source`` still provides the ``val_seen`` view, the diagnostics probe and the puzzle-id table (fresh
episodes carry the blank id 0); the evaluation tasks must not follow any training rule of the stream (checked at
setup: an evaluation task that a training rule explains, demos and known outputs alike, is refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from trm_lightning.checks import check_at_least, check_range
from trm_lightning.data.episodes import EpisodeKey, EpisodeSampler
from trm_lightning.data.fewshot_rules import FEWSHOT_FAMILIES, FewshotRule, RuleTaskStream, split_rules
from trm_lightning.errors import ConfigError

FRESH_KEYS_STREAM = 0xF7E5  # the random stream of a fresh epoch's keys (queries, augmentations)


@dataclass
class FreshTasks:
    """``data.fresh_tasks``: which tasks to generate.

    Attributes:
        families: rule families (``trm_lightning.data.fewshot_rules.FEWSHOT_FAMILIES``).
        heldout_fraction: share of each family's rules the split holds out (never generated).
        split_seed: seed of the rule split (the held-out tasks must come from the same split).
        n_demos: demo pairs per task.
        n_test: test pairs per task (the query is one of them, or a demo with ``data.leave_one_out_prob``).
        min_side: smallest grid side.
        max_side: largest grid side (``tile`` inputs at most half of it).
        siblings: tasks come in groups of this many consecutive ones (so in one batch) that share every input
            grid and differ in the rule: the same family and colour ``c``, another operation ``s``
            (:class:`~trm_lightning.data.fewshot_rules.RuleTaskStream`). Against the rule-part shortcut: within
            a group only the demos tell the operation, and each task's context has its siblings as hard
            negatives for ``model.context_contrastive_weight``. 1: independent tasks. Under DDP the ranks take
            every ``world``-th task, so the siblings of a group land on neighbouring ranks.
    """

    families: list[str] = field(default_factory=lambda: list(FEWSHOT_FAMILIES))
    heldout_fraction: float = 0.25
    split_seed: int = 0
    n_demos: int = 3
    n_test: int = 1
    min_side: int = 3
    max_side: int = 6
    siblings: int = 1

    def check(self) -> None:
        key = "data.fresh_tasks."
        unknown = [f for f in self.families if f not in FEWSHOT_FAMILIES]
        if unknown or not self.families:
            raise ConfigError(f"{key}families must be a non-empty list of {list(FEWSHOT_FAMILIES)}, got {self.families}")
        check_range(key + "heldout_fraction", self.heldout_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_at_least(key + "split_seed", self.split_seed, 0)
        check_at_least(key + "n_demos", self.n_demos, 1)
        check_at_least(key + "n_test", self.n_test, 1)
        check_at_least(key + "min_side", self.min_side, 1)
        check_at_least(key + "max_side", self.max_side, max(4, self.min_side))
        check_at_least(key + "siblings", self.siblings, 1)

    def split(self) -> tuple[list[FewshotRule], list[FewshotRule]]:
        """(training rules, held-out rules) of the split."""
        return split_rules(self.families, self.heldout_fraction, self.split_seed)

    def stream(self, tasks_per_epoch: int, seed: int) -> RuleTaskStream:
        """The stream of tasks over the training rules (none of which a held-out rule explains)."""
        train, heldout = self.split()
        return RuleTaskStream(train, tasks_per_epoch, seed, self.n_demos, self.n_test, self.min_side, self.max_side,
                              avoid=heldout, siblings=self.siblings)


class FreshTaskSampler(EpisodeSampler):
    """The keys of epoch ``e``: tasks ``e * E + i`` of the stream, ``i < E = episodes_per_epoch``, one episode each
    (query: a test pair, or with ``leave_one_out_prob`` a demo), drawn from ``np.random.default_rng([seed, e, ...])``;
    the tasks of a sibling group (``stream.siblings``) share their draws, so they share the query too.
    Split across ranks and resumed mid-epoch as :class:`~trm_lightning.data.episodes.EpisodeSampler` is.
    """

    def __init__(
        self,
        dataset: Dataset,
        stream: RuleTaskStream,
        episodes_per_epoch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_augmentations: int = 1,
        leave_one_out_prob: float = 0.0,
    ) -> None:
        self._init_epochs(dataset, episodes_per_epoch, num_replicas, rank, seed, num_augmentations, leave_one_out_prob)
        self.stream = stream

    def global_keys(self, epoch: int | None = None) -> list[EpisodeKey]:
        epoch = self.epoch if epoch is None else epoch
        n = self.episodes_per_epoch
        rng = np.random.default_rng([self.seed, epoch, FRESH_KEYS_STREAM])
        loo_draw = rng.random(n)
        pair_draw = rng.random(n)
        augs = rng.integers(0, self.num_augmentations, size=n)
        n_demos, n_test = self.stream.n_demos, self.stream.n_test
        keys = []
        siblings = self.stream.siblings
        for i in range(n):
            task = epoch * n + i
            first = max(i - task % siblings, 0)  # the draws of the group's first task in this epoch (itself when 1)
            loo_u, pair_u, aug = loo_draw[first], pair_draw[first], int(augs[first])
            if n_demos >= 2 and loo_u < self.leave_one_out_prob:
                keys.append(EpisodeKey(task, min(int(pair_u * n_demos), n_demos - 1), aug, True))
            else:
                keys.append(EpisodeKey(task, min(int(pair_u * n_test), n_test - 1), aug, False))
        return keys


def check_no_training_rule_explains(eval_tasks: Sequence, rules: Sequence[FewshotRule]) -> None:
    """Refuse evaluation tasks that a training rule explains (every known pair): with ``data.fresh_tasks`` training
    generates tasks of those rules, so such an evaluation task would not be held out."""
    from trm_lightning.data.fewshot_rules import explaining_rules

    for task in eval_tasks:
        found = explaining_rules(task, rules)
        if found:
            raise ConfigError(
                f"data.fresh_tasks: evaluation task '{task.task_id}' follows the training rule {found[0].name}: "
                "training would generate tasks of it (is data.fresh_tasks.split_seed the split of the evaluation "
                "tasks?)"
            )
