"""The tests' fixture tasks: one simple rule each (flip, rotate, recolour, ...) over small random grids."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from trm_lightning.data.arc import ArcTask, readonly_grid
from trm_lightning.data.fewshot_rules import gravity_down

Rule = Callable[[np.ndarray], np.ndarray]

RULE_NAMES = (
    "identity",
    "flip_lr",
    "flip_ud",
    "transpose",
    "rotate90",
    "rotate180",
    "colour_map",
    "fill_background",
    "cycle_colours",
    "gravity_down",
)


def _rules(rng: np.random.Generator) -> dict[str, Rule]:
    """The rule catalogue; colour-dependent rules draw their colours from ``rng`` (one draw per task)."""
    colour_map = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
    background = np.uint8(rng.integers(1, 10))
    shift = int(rng.integers(1, 9))
    return {
        "identity": lambda g: g.copy(),
        "flip_lr": np.fliplr,
        "flip_ud": np.flipud,
        "transpose": lambda g: g.T,
        "rotate90": np.rot90,
        "rotate180": lambda g: np.rot90(g, 2),
        "colour_map": lambda g: colour_map[g],
        "fill_background": lambda g: np.where(g == 0, background, g),
        "cycle_colours": lambda g: np.where(g == 0, 0, (g - 1 + shift) % 9 + 1),
        "gravity_down": gravity_down,
    }


def _random_grid(rng: np.random.Generator, min_side: int, max_side: int) -> np.ndarray:
    height, width = rng.integers(min_side, max_side + 1, size=2)
    colours = rng.integers(1, 10, size=(height, width))
    keep = rng.random((height, width)) < 0.6
    return np.where(keep, colours, 0).astype(np.uint8)


def make_synthetic_tasks(
    n_tasks: int,
    seed: int = 0,
    min_side: int = 2,
    max_side: int = 5,
    n_train: int = 3,
    n_test: int = 1,
    prefix: str = "syn",
    rules: Sequence[str] | None = None,
) -> list[ArcTask]:
    """Generate ``n_tasks`` tasks with ids ``f"{prefix}{i:03d}"``; deterministic given the arguments.

    Args:
        n_tasks: number of tasks.
        seed: generator seed.
        min_side: smallest grid side.
        max_side: largest grid side (outputs keep the input's shape or transpose it).
        n_train: demonstration pairs per task.
        n_test: test pairs per task (outputs known).
        prefix: task id prefix.
        rules: rule names to cycle through (default: all of :data:`RULE_NAMES`); task ``i`` uses
            ``rules[(start + i) % len(rules)]`` for a seed-dependent ``start``.
    """
    if not 1 <= min_side <= max_side <= 30:
        raise ValueError(f"need 1 <= min_side <= max_side <= 30, got {min_side}, {max_side}")
    names = tuple(rules) if rules is not None else RULE_NAMES
    unknown = [name for name in names if name not in RULE_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown rules {unknown}; choose from {RULE_NAMES}")
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, len(names)))
    tasks = []
    for i in range(n_tasks):
        rule_name = names[(start + i) % len(names)]
        rule = _rules(rng)[rule_name]
        pairs = []
        for _ in range(n_train + n_test):
            grid = _random_grid(rng, min_side, max_side)
            pairs.append((readonly_grid(grid), readonly_grid(rule(grid))))
        tasks.append(
            ArcTask(
                task_id=f"{prefix}{i:03d}",
                train=tuple(pairs[:n_train]),
                test=tuple(pairs[n_train:]),
                source=f"synthetic:{rule_name}",
            )
        )
    return tasks
