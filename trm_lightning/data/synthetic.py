"""Procedurally generated ARC-style tasks, for tests and small benchmarks (never downloaded).

Every task follows one simple rule (flip, rotate, transpose, recolour, ...) over small random grids, so a
canvas of 6-8 holds them with default sizes (``max_side=5``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from trm_lightning.data.arc import ArcTask

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
        "gravity_down": _gravity_down,
    }


def _gravity_down(grid: np.ndarray) -> np.ndarray:
    """Let the coloured cells of each column fall to the bottom, keeping their order."""
    out = np.zeros_like(grid)
    height = grid.shape[0]
    for c in range(grid.shape[1]):
        cells = grid[:, c][grid[:, c] != 0]
        out[height - len(cells) :, c] = cells
    return out


def _random_grid(rng: np.random.Generator, min_side: int, max_side: int) -> np.ndarray:
    height, width = rng.integers(min_side, max_side + 1, size=2)
    colours = rng.integers(1, 10, size=(height, width))
    keep = rng.random((height, width)) < 0.6
    return np.where(keep, colours, 0).astype(np.uint8)


def _frozen(grid: np.ndarray) -> np.ndarray:
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    grid.setflags(write=False)
    return grid


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
            pairs.append((_frozen(grid), _frozen(rule(grid))))
        tasks.append(
            ArcTask(
                task_id=f"{prefix}{i:03d}",
                train=tuple(pairs[:n_train]),
                test=tuple(pairs[n_train:]),
                source=f"synthetic:{rule_name}",
            )
        )
    return tasks


def task_to_json(task: ArcTask) -> dict:
    """The task in ARC JSON form (``{"train": [...], "test": [...]}``); unknown test outputs are left out."""

    def pair(inp: np.ndarray, out: np.ndarray | None) -> dict:
        item = {"input": inp.tolist()}
        if out is not None:
            item["output"] = out.tolist()
        return item

    return {"train": [pair(i, o) for i, o in task.train], "test": [pair(i, o) for i, o in task.test]}


def write_task_dir(tasks: Sequence[ArcTask], directory: str | Path) -> Path:
    """Write ``<task_id>.json`` for every task into ``directory`` (created if needed) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (directory / f"{task.task_id}.json").write_text(json.dumps(task_to_json(task)), encoding="utf-8")
    return directory
