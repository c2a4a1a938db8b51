"""The held-out-rule benchmark's tasks: rule families ``family(s, c)``, their train/held-out split, generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from trm_lightning.data.arc import ArcTask, readonly_grid
from trm_lightning.data.augment import dihedral
from trm_lightning.data.episodes import TaskStream

# Every rule is ``family(s, c)``: a structural operation chosen by ``s`` (a transform, a direction, a mode)
# whose result is drawn in colour ``c``. Within a family every task draws its inputs from the same
# distribution, whatever (s, c) is, so the input alone never tells which rule a task follows: only the demos
# do. The split holds out (s, c) combinations: a held-out rule never occurs in training, but its ``s`` occurs
# there with other colours and its ``c`` with other ``s`` of the same family.

FEWSHOT_FAMILIES = ("paint", "outline", "frame", "recolour", "dihedral", "gravity", "lines", "fill", "size", "tile")
NUM_DRAWING_COLOURS = 9  # drawing colours 1..9; 0 is the background


@dataclass(frozen=True)
class FewshotRule:
    """One rule instance of the few-shot family: ``family(s, c)``.

    Attributes:
        family: one of :data:`FEWSHOT_FAMILIES`.
        s: the structural parameter, its meaning per family:

            - ``paint``: a per-cell rule: 0 paints every coloured cell ``c``, 1 every background cell;
            - ``outline``: background cells next to a coloured cell are painted ``c``: 0 next to it by a side,
              1 by a corner only, 2 to its left or right, 3 above or below it;
            - ``frame``: cells on the grid's edge are painted ``c``: 0 all four edges, 1 the top and bottom
              rows, 2 the left and right columns, 3 the four corners;
            - ``recolour``: the colour (1..9) whose cells become ``c`` (``s != c``); the others stay;
            - ``dihedral``: the transform 1..7 of :func:`~trm_lightning.data.augment.dihedral` applied to a
              one-colour shape, then the shape is painted ``c``;
            - ``gravity``: the side the coloured cells fall to (0 down, 1 up, 2 left, 3 right); fallen cells
              are painted ``c``;
            - ``lines``: from every single coloured pixel a ray goes to the grid's edge in direction ``s``
              (0 down, 1 up, 2 left, 3 right), drawn in ``c`` over the background;
            - ``fill``: 0 paints the background enclosed by rectangle outlines with ``c``, 1 the background
              outside them;
            - ``size``: 0 paints the largest of several same-coloured rectangles with ``c``, 1 the smallest;
            - ``tile``: how the grid is doubled (0 ``[g g]``, 1 ``[g; g]``, 2 ``[g fliplr(g)]``, 3
              ``[g; flipud(g)]``), then the background of the result is painted ``c``.
        c: the drawing colour, 1..9.
    """

    family: str
    s: int
    c: int

    def __post_init__(self) -> None:
        if self.family not in FEWSHOT_FAMILIES:
            raise ValueError(f"unknown rule family {self.family!r}; choose from {FEWSHOT_FAMILIES}")
        if (self.s, self.c) not in rule_params(self.family):
            raise ValueError(f"{self.family} has no parameters s={self.s}, c={self.c}")

    @property
    def name(self) -> str:
        """``family(s,c)``, e.g. ``dihedral(4,7)``; :func:`parse_rule` reads it back."""
        return f"{self.family}({self.s},{self.c})"

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """The rule's output for ``grid`` (uint8, colours 0..9)."""
        return np.ascontiguousarray(_APPLY[self.family](np.asarray(grid, dtype=np.uint8), self.s, self.c), np.uint8)

    def sample_input(self, rng: np.random.Generator, min_side: int, max_side: int) -> np.ndarray:
        """A random input of this rule's family; the distribution depends on the family only, never on
        ``s`` or ``c`` (tasks then keep the inputs the rule changes, see :func:`make_rule_tasks`)."""
        return _sample_input(self.family, rng, min_side, max_side)


def rule_params(family: str) -> tuple[tuple[int, int], ...]:
    """Every ``(s, c)`` of ``family``, in a fixed order."""
    colours = range(1, NUM_DRAWING_COLOURS + 1)
    structural = {"paint": range(2), "outline": range(4), "frame": range(4), "recolour": range(1, 10), "dihedral": range(1, 8), "gravity": range(4), "lines": range(4),
                  "fill": range(2), "size": range(2), "tile": range(4)}
    if family not in structural:
        raise ValueError(f"unknown rule family {family!r}; choose from {FEWSHOT_FAMILIES}")
    return tuple((s, c) for s in structural[family] for c in colours if not (family == "recolour" and s == c))


def parse_rule(name: str) -> FewshotRule:
    """The rule named ``family(s,c)`` (the inverse of :attr:`FewshotRule.name`)."""
    family, _, rest = name.partition("(")
    try:
        s, c = (int(v) for v in rest.rstrip(")").split(","))
    except ValueError:
        raise ValueError(f"not a rule name: {name!r} (expected 'family(s,c)')") from None
    return FewshotRule(family, s, c)


def rule_of(task: ArcTask) -> FewshotRule:
    """The rule of a task made by :func:`make_rule_tasks` (kept in ``task.source`` as ``fewshot:<name>``)."""
    prefix = "fewshot:"
    if not task.source.startswith(prefix):
        raise ValueError(f"task '{task.task_id}' is not a few-shot rule task (source {task.source!r})")
    return parse_rule(task.source[len(prefix):])


# ----------------------------------------------------------------------------------------------- the rules
def _paint(grid: np.ndarray, c: int) -> np.ndarray:
    return np.where(grid != 0, c, 0)


def gravity_down(grid: np.ndarray) -> np.ndarray:
    """Let the coloured cells of each column fall to the bottom, keeping their order."""
    out = np.zeros_like(grid)
    height = grid.shape[0]
    for c in range(grid.shape[1]):
        cells = grid[:, c][grid[:, c] != 0]
        out[height - len(cells) :, c] = cells
    return out


def _gravity(grid: np.ndarray, side: int) -> np.ndarray:
    """Coloured cells slide to ``side`` (0 down, 1 up, 2 left, 3 right) keeping their order."""
    # rotate so that the side becomes "down", let fall, rotate back
    turns = {0: 0, 1: 2, 2: 1, 3: 3}[side]
    return np.rot90(gravity_down(np.rot90(grid, turns)), -turns)


_RAY = {0: (1, 0), 1: (-1, 0), 2: (0, -1), 3: (0, 1)}


def _lines(grid: np.ndarray, direction: int, c: int) -> np.ndarray:
    out = grid.copy()
    dr, dc = _RAY[direction]
    height, width = grid.shape
    for r, col in zip(*np.nonzero(grid)):
        r, col = r + dr, col + dc
        while 0 <= r < height and 0 <= col < width:
            if out[r, col] == 0:
                out[r, col] = c
            r, col = r + dr, col + dc
    return out


def _outside_background(grid: np.ndarray) -> np.ndarray:
    """Mask of background cells 4-connected to the grid's border through background."""
    height, width = grid.shape
    seen = np.zeros(grid.shape, dtype=bool)
    stack = [(r, c) for r in range(height) for c in range(width)
             if (r in (0, height - 1) or c in (0, width - 1)) and grid[r, c] == 0]
    while stack:
        r, c = stack.pop()
        if seen[r, c]:
            continue
        seen[r, c] = True
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < height and 0 <= nc < width and grid[nr, nc] == 0 and not seen[nr, nc]:
                stack.append((nr, nc))
    return seen


def _fill(grid: np.ndarray, mode: int, c: int) -> np.ndarray:
    outside = _outside_background(grid)
    target = (grid == 0) & (~outside if mode == 0 else outside)
    return np.where(target, c, grid)


def _objects(grid: np.ndarray) -> list[np.ndarray]:
    """Masks of the 4-connected components of non-background cells."""
    height, width = grid.shape
    label = np.zeros(grid.shape, dtype=np.int32)
    masks = []
    for start in zip(*np.nonzero(grid)):
        if label[start]:
            continue
        n = len(masks) + 1
        stack = [start]
        label[start] = n
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < height and 0 <= nc < width and grid[nr, nc] != 0 and not label[nr, nc]:
                    label[nr, nc] = n
                    stack.append((nr, nc))
        masks.append(label == n)
    return masks


def _size(grid: np.ndarray, mode: int, c: int) -> np.ndarray:
    masks = _objects(grid)
    sizes = [int(m.sum()) for m in masks]
    chosen = masks[int(np.argmax(sizes) if mode == 0 else np.argmin(sizes))]
    return np.where(chosen, c, grid)


def _tile(grid: np.ndarray, mode: int, c: int) -> np.ndarray:
    if mode == 0:
        out = np.hstack([grid, grid])
    elif mode == 1:
        out = np.vstack([grid, grid])
    elif mode == 2:
        out = np.hstack([grid, np.fliplr(grid)])
    else:
        out = np.vstack([grid, np.flipud(grid)])
    return np.where(out == 0, c, out)


def _outline(grid: np.ndarray, mode: int, c: int) -> np.ndarray:
    coloured = np.pad(grid != 0, 1)
    height, width = grid.shape

    def shifted(dr: int, dc: int) -> np.ndarray:  # coloured[r + dr, c + dc] for every cell (r, c)
        return coloured[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]

    sides = {"h": shifted(0, -1) | shifted(0, 1), "v": shifted(-1, 0) | shifted(1, 0)}
    corners = shifted(-1, -1) | shifted(-1, 1) | shifted(1, -1) | shifted(1, 1)
    near = {0: sides["h"] | sides["v"], 1: corners & ~(sides["h"] | sides["v"]), 2: sides["h"], 3: sides["v"]}[mode]
    return np.where((grid == 0) & near, c, grid)


def _frame(grid: np.ndarray, mode: int, c: int) -> np.ndarray:
    height, width = grid.shape
    rows = np.zeros(grid.shape, dtype=bool)
    rows[[0, height - 1], :] = True
    cols = np.zeros(grid.shape, dtype=bool)
    cols[:, [0, width - 1]] = True
    edge = {0: rows | cols, 1: rows, 2: cols, 3: rows & cols}[mode]
    return np.where(edge, c, grid)


_APPLY: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "paint": lambda g, s, c: np.where((g != 0) if s == 0 else (g == 0), c, g),
    "outline": _outline,
    "frame": _frame,
    "recolour": lambda g, s, c: np.where(g == s, c, g),
    "dihedral": lambda g, s, c: _paint(dihedral(g, s), c),
    "gravity": lambda g, s, c: _paint(_gravity(g, s), c),
    "lines": _lines,
    "fill": _fill,
    "size": _size,
    "tile": _tile,
}


# ------------------------------------------------------------------------------------------------- inputs
def _sides(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    height, width = rng.integers(min_side, max_side + 1, size=2)
    return int(height), int(width)


def _colour(rng: np.random.Generator) -> int:
    return int(rng.integers(1, NUM_DRAWING_COLOURS + 1))


def _scatter(rng: np.random.Generator, height: int, width: int, density: float) -> np.ndarray:
    """Random cells of random colours 1..9 (about ``density`` of them), at least one."""
    while True:
        keep = rng.random((height, width)) < density
        if keep.any():
            return np.where(keep, rng.integers(1, NUM_DRAWING_COLOURS + 1, size=(height, width)), 0).astype(np.uint8)


def _one_colour_shape(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """About half the cells in one random colour, at least one."""
    return np.where(_scatter(rng, height, width, 0.5) != 0, _colour(rng), 0).astype(np.uint8)


def _pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One to three isolated pixels of random colours (no two in the same row or column)."""
    grid = np.zeros((height, width), dtype=np.uint8)
    n = int(rng.integers(1, min(3, height, width) + 1))
    rows = rng.choice(height, size=n, replace=False)
    cols = rng.choice(width, size=n, replace=False)
    for r, c in zip(rows, cols):
        grid[r, c] = _colour(rng)
    return grid


def _place_rectangles(rng: np.random.Generator, height: int, width: int, sizes: list[tuple[int, int]]) -> list | None:
    """Top-left corners for rectangles of ``sizes`` that neither overlap nor touch (4-neighbourhood), or None."""
    taken = np.zeros((height + 2, width + 2), dtype=bool)  # padded by one: the margin test stays in bounds
    corners = []
    for h, w in sizes:
        free = [(r, c) for r in range(height - h + 1) for c in range(width - w + 1)
                if not taken[r : r + h + 2, c : c + w + 2].any()]
        if not free:
            return None
        r, c = free[int(rng.integers(len(free)))]
        taken[r + 1 : r + h + 1, c + 1 : c + w + 1] = True
        corners.append((r, c))
    return corners


def _outlines(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One or two hollow rectangles (at least 3x3) of one random colour on the background."""
    height, width = max(height, 3), max(width, 3)
    for _ in range(100):
        n = int(rng.integers(1, 3))
        sizes = [(int(rng.integers(3, height + 1)), int(rng.integers(3, width + 1))) for _ in range(n)]
        corners = _place_rectangles(rng, height, width, sizes)
        if corners is not None:
            break
    else:  # one rectangle always fits
        sizes, corners = [(3, 3)], [(0, 0)]
    grid = np.zeros((height, width), dtype=np.uint8)
    colour = _colour(rng)
    for (h, w), (r, c) in zip(sizes, corners):
        grid[r : r + h, c : c + w] = colour
        grid[r + 1 : r + h - 1, c + 1 : c + w - 1] = 0
    return grid


def _rectangles_of_distinct_sizes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Two or three solid rectangles of one random colour, distinct areas, not touching each other."""
    height, width = max(height, 3), max(width, 4)
    for _ in range(200):
        n = int(rng.integers(2, 4))
        sizes = [(int(rng.integers(1, 4)), int(rng.integers(1, 4))) for _ in range(n)]
        if len({h * w for h, w in sizes}) < n:
            continue
        corners = _place_rectangles(rng, height, width, sizes)
        if corners is not None:
            break
    else:
        sizes, corners = [(1, 1), (1, 2)], [(0, 0), (2, 0)]
    grid = np.zeros((height, width), dtype=np.uint8)
    colour = _colour(rng)
    for (h, w), (r, c) in zip(sizes, corners):
        grid[r : r + h, c : c + w] = colour
    return grid


def _sample_input(family: str, rng: np.random.Generator, min_side: int, max_side: int) -> np.ndarray:
    if family == "tile":  # the doubled output must fit: inputs up to half the largest side
        max_side = max(1, max_side // 2)
        min_side = min(min_side, max_side)
    height, width = _sides(rng, min_side, max_side)
    if family == "recolour":
        return _scatter(rng, height, width, 0.6)
    if family == "dihedral":
        return _one_colour_shape(rng, height, width)
    if family in ("gravity", "tile"):
        return _scatter(rng, height, width, 0.4 if family == "gravity" else 0.6)
    if family in ("paint", "frame"):
        return _scatter(rng, height, width, 0.5)
    if family == "outline":
        return _scatter(rng, height, width, 0.2)
    if family == "lines":
        return _pixels(rng, height, width)
    if family == "fill":
        return _outlines(rng, height, width)
    if family == "size":
        return _rectangles_of_distinct_sizes(rng, height, width)
    raise ValueError(f"unknown rule family {family!r}")


# -------------------------------------------------------------------------------------------------- split
def split_rules(
    families: Sequence[str] = FEWSHOT_FAMILIES, heldout_fraction: float = 0.25, seed: int = 0
) -> tuple[list[FewshotRule], list[FewshotRule]]:
    """Split every family's ``(s, c)`` parameters into training rules and held-out rules.

    Per family, the parameters are visited in a seeded random order and each is held out while fewer than
    ``round(heldout_fraction * len(params))`` are and while its ``s`` and its ``c`` both still occur among the
    family's remaining training parameters. So a held-out rule is a new *combination* of parts that training
    shows separately: it is never learned as such, but its parts can be read from its demos.

    Returns:
        (train_rules, heldout_rules), disjoint, each ordered by ``families`` then by parameters.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    unknown = [f for f in families if f not in FEWSHOT_FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown rule families {unknown}; choose from {FEWSHOT_FAMILIES}")
    train: list[FewshotRule] = []
    heldout: list[FewshotRule] = []
    for family in dict.fromkeys(families):
        params = rule_params(family)
        # keyed by the family, not its position: a family's split does not depend on which others are chosen
        rng = np.random.default_rng([seed, FEWSHOT_FAMILIES.index(family), 0xF5])
        target = round(heldout_fraction * len(params))
        s_count = {s: sum(p[0] == s for p in params) for s, _ in params}
        c_count = {c: sum(p[1] == c for p in params) for _, c in params}
        chosen: set[tuple[int, int]] = set()
        for i in rng.permutation(len(params)):
            if len(chosen) >= target:
                break
            s, c = params[int(i)]
            if s_count[s] > 1 and c_count[c] > 1:
                chosen.add((s, c))
                s_count[s] -= 1
                c_count[c] -= 1
        train += [FewshotRule(family, s, c) for s, c in params if (s, c) not in chosen]
        heldout += [FewshotRule(family, s, c) for s, c in params if (s, c) in chosen]
    return train, heldout


def _visible_pair(
    rule: FewshotRule, rng: np.random.Generator, min_side: int, max_side: int, tries: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """An (input, output) pair whose output differs from its input, so the pair shows the rule at work
    (inputs are redrawn from the family's distribution until then: e.g. ``recolour(s, c)`` needs colour ``s``)."""
    for _ in range(tries):
        grid = rule.sample_input(rng, min_side, max_side)
        out = rule.apply(grid)
        if not np.array_equal(grid, out):
            return readonly_grid(grid), readonly_grid(out)
    raise RuntimeError(f"{rule.name}: no input in {tries} draws that the rule changes (grid sides {min_side}..{max_side})")


TASK_STREAM = 0x7A5C  # the random stream of make_rule_tasks (the pinned training and held-out tasks)
NEW_TASK_STREAM = 0x7A5D  # new tasks of already-split rules (the benchmark's unseen tasks of the training rules)


def make_rule_tasks(
    rules: Sequence[FewshotRule],
    n_tasks: int,
    seed: int,
    prefix: str,
    n_demos: int = 3,
    n_test: int = 1,
    min_side: int = 3,
    max_side: int = 6,
    stream: int = TASK_STREAM,
    avoid: Sequence[FewshotRule] = (),
) -> list[ArcTask]:
    """``n_tasks`` tasks over ``rules``: every rule once (in a seeded order) before any rule twice.

    Each task has ``n_demos`` demo pairs and ``n_test`` test pairs, inputs drawn fresh from its family's
    distribution and kept only when the rule changes them (an unchanged pair would show nothing); ids ``f"{prefix}{i:04d}"``; ``source`` is ``fewshot:<rule name>`` (see :func:`rule_of`).
    Grids are at most ``max_side`` on a side (``tile`` inputs at most half that, so outputs are too).
    ``stream`` names the random stream next to ``seed``: another stream gives other tasks of the same rules (the
    benchmark's new tasks of the training rules use :data:`NEW_TASK_STREAM`). A task that a rule of ``avoid``
    also explains (every pair, :func:`explaining_rules`) is drawn again: the other split's rules, so that no task
    shows a rule of the other split at work.
    """
    if not rules:
        raise ValueError("make_rule_tasks needs at least one rule")
    if not 1 <= min_side <= max_side <= 30 or max_side < 4:
        raise ValueError(f"need 1 <= min_side <= max_side <= 30 and max_side >= 4, got {min_side}, {max_side}")
    if n_demos < 1 or n_test < 1:
        raise ValueError(f"need n_demos >= 1 and n_test >= 1, got {n_demos}, {n_test}")
    rng = np.random.default_rng([seed, stream])
    rounds = -(-n_tasks // len(rules))
    order = np.concatenate([rng.permutation(len(rules)) for _ in range(rounds)])[:n_tasks]
    tasks = []
    for i, r in enumerate(order.tolist()):
        tasks.append(_draw_task(rules[r], rng, f"{prefix}{i:04d}", n_demos, n_test, min_side, max_side, avoid))
    return tasks


def _draw_task(
    rule: FewshotRule, rng: np.random.Generator, task_id: str, n_demos: int, n_test: int, min_side: int,
    max_side: int, avoid: Sequence[FewshotRule], tries: int = 100,
) -> ArcTask:
    """A task of ``rule`` (pairs that show it at work) that no rule of ``avoid`` explains."""
    for _ in range(tries):
        pairs = [_visible_pair(rule, rng, min_side, max_side) for _ in range(n_demos + n_test)]
        task = ArcTask(task_id, tuple(pairs[:n_demos]), tuple(pairs[n_demos:]), f"fewshot:{rule.name}")
        if not avoid or not explaining_rules(task, avoid):
            return task
    raise RuntimeError(f"{rule.name}: every one of {tries} tasks is explained by a rule to avoid")


def make_fewshot_split(
    n_train_tasks: int,
    n_heldout_tasks: int,
    seed: int = 0,
    *,
    families: Sequence[str] = FEWSHOT_FAMILIES,
    heldout_fraction: float = 0.25,
    n_demos: int = 3,
    n_test: int = 1,
    min_side: int = 3,
    max_side: int = 6,
) -> tuple[list[ArcTask], list[ArcTask]]:
    """Training tasks over the training rules and held-out tasks over the held-out rules of
    :func:`split_rules`; ids ``fs_train_NNNN`` and ``fs_heldout_NNNN``; deterministic given the arguments.

    A held-out task's input distribution is its family's, the same as the training tasks of that family, and
    held-out rules of one family map the same input to different outputs: only the demos say what to do. No
    training task is explained by a held-out rule, and no held-out task by a training rule (such coincidences
    exist across families, e.g. ``fill(1, c)`` and ``paint(1, c)`` on grids without enclosed background: they are
    drawn again), so a held-out rule is never shown in training, not even by accident.
    """
    train_rules, heldout_rules = split_rules(families, heldout_fraction, seed)
    if not heldout_rules:
        raise ValueError(f"heldout_fraction={heldout_fraction} holds out no rule of {list(families)}")
    common = dict(n_demos=n_demos, n_test=n_test, min_side=min_side, max_side=max_side)
    train = make_rule_tasks(train_rules, n_train_tasks, seed=seed * 2 + 0, prefix="fs_train_", avoid=heldout_rules,
                            **common)
    heldout = make_rule_tasks(heldout_rules, n_heldout_tasks, seed=seed * 2 + 1, prefix="fs_heldout_",
                              avoid=train_rules, **common)
    return train, heldout


# ---------------------------------------------------------------------------------------- tasks on the fly
FRESH_TASK_STREAM = 0x7A5E  # the random stream of RuleTaskStream's grids
FRESH_ORDER_STREAM = 0x7A5F  # ... and of its rule order
FRESH_SIBLING_STREAM = 0x7A61  # ... and of a sibling group's shared grids and sibling rules (``siblings > 1``)


def sibling_rules(rule: FewshotRule, rules: Sequence[FewshotRule]) -> list[FewshotRule]:
    """The rules of ``rules`` a task of ``rule`` gets as siblings: the same family and colour ``c`` with another
    operation ``s``; where there is none, the family's other rules; where there is none either, ``rule`` itself."""
    same_c = [r for r in rules if r.family == rule.family and r.c == rule.c and r.s != rule.s]
    if same_c:
        return same_c
    family = [r for r in rules if r.family == rule.family and r != rule]
    return family or [rule]


def _draw_sibling_tasks(
    members: Sequence[FewshotRule], rng: np.random.Generator, task_ids: Sequence[str], n_demos: int, n_test: int,
    min_side: int, max_side: int, avoid: Sequence[FewshotRule], tries: int = 100,
) -> list[ArcTask]:
    """One task per rule of ``members`` (one family), all on the same input grids: every grid is one that each
    member changes, and no task is one that a rule of ``avoid`` explains."""
    for _ in range(tries):
        pairs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in members]
        for _slot in range(n_demos + n_test):
            for _draw in range(tries):
                grid = members[0].sample_input(rng, min_side, max_side)
                outs = [rule.apply(grid) for rule in members]
                if not any(np.array_equal(grid, out) for out in outs):
                    break
            else:
                raise RuntimeError(f"{[r.name for r in members]}: no input in {tries} draws that every sibling "
                                   f"changes (grid sides {min_side}..{max_side})")
            for member_pairs, out in zip(pairs, outs):
                member_pairs.append((readonly_grid(grid), readonly_grid(out)))
        tasks = [ArcTask(task_id, tuple(p[:n_demos]), tuple(p[n_demos:]), f"fewshot:{rule.name}")
                 for task_id, p, rule in zip(task_ids, pairs, members)]
        if not avoid or not any(explaining_rules(task, avoid) for task in tasks):
            return tasks
    raise RuntimeError(f"{[r.name for r in members]}: every one of {tries} sibling groups is explained by a rule to "
                       "avoid")


class RuleTaskStream(TaskStream):
    """Tasks generated on demand from ``rules``: ``stream[g]`` is task ``g``, a pure function of ``(seed, g)``, made
    when it is asked for and never stored. Any number of distinct tasks, so training can see each task once.

    Rules come in blocks of ``len(rules)`` indices, each block a seeded permutation of the rules (every rule once
    per block, as :func:`make_rule_tasks` does); the pairs of task ``g`` come from their own random stream. Every
    task has ``n_demos`` demos and ``n_test`` test pairs whose output differs from the input, and no rule of ``avoid``
    (the held-out rules) explains it. Ids are
    ``f"{prefix}{g:09d}"`` and ``source`` is ``fewshot:<rule name>`` (see :func:`rule_of`).

    ``len(stream)`` is ``tasks_per_epoch``, the tasks one epoch visits (``stream[g]`` is defined for every ``g >= 0``:
    epoch ``e`` visits ``e * tasks_per_epoch`` up to the next epoch's first task).

    With ``siblings = k > 1`` the tasks come in groups of ``k`` consecutive indices (``g // k``). The group's first
    task follows the group's rule (the blocks above are then blocks of groups); the others follow its
    :func:`sibling_rules` (the same family and colour ``c``, another operation ``s``; drawn per group), and every
    task of the group has the *same* input grids, demos and tests alike. Within a group only the demos say which
    operation to apply: the query, its colours and the family's input distribution are the same.
    """

    def __init__(
        self,
        rules: Sequence[FewshotRule],
        tasks_per_epoch: int,
        seed: int = 0,
        n_demos: int = 3,
        n_test: int = 1,
        min_side: int = 3,
        max_side: int = 6,
        prefix: str = "gen_",
        avoid: Sequence[FewshotRule] = (),
        siblings: int = 1,
    ) -> None:
        if not rules:
            raise ValueError("RuleTaskStream needs at least one rule")
        if siblings < 1:
            raise ValueError(f"need siblings >= 1, got {siblings}")
        if tasks_per_epoch < 1 or n_demos < 1 or n_test < 1:
            raise ValueError(f"need tasks_per_epoch, n_demos, n_test >= 1, got {tasks_per_epoch}, {n_demos}, {n_test}")
        if not 1 <= min_side <= max_side <= 30 or max_side < 4:
            raise ValueError(f"need 1 <= min_side <= max_side <= 30 and max_side >= 4, got {min_side}, {max_side}")
        self.rules = tuple(rules)
        self.tasks_per_epoch = tasks_per_epoch
        self.seed = seed
        self.n_demos = n_demos
        self.n_test = n_test
        self.min_side = min_side
        self.max_side = max_side
        self.prefix = prefix
        self.avoid = tuple(avoid)
        self.siblings = siblings
        self._block: tuple[int, np.ndarray] | None = None  # the last block's rule order
        self._group: tuple[int, list[ArcTask]] | None = None  # the last sibling group's tasks

    def __len__(self) -> int:
        return self.tasks_per_epoch

    def _lead_rule(self, group: int) -> FewshotRule:
        block, within = divmod(int(group), len(self.rules))
        if self._block is None or self._block[0] != block:
            self._block = (block, np.random.default_rng([self.seed, block, FRESH_ORDER_STREAM]).permutation(len(self.rules)))
        return self.rules[int(self._block[1][within])]

    def _group_rules(self, group: int) -> tuple[list[FewshotRule], np.random.Generator]:
        """The rules of sibling group ``group`` (its first task's rule first) and the group's random stream, which
        then draws its grids."""
        lead = self._lead_rule(group)
        rng = np.random.default_rng([self.seed, group, FRESH_SIBLING_STREAM])
        others = sibling_rules(lead, self.rules)
        order = rng.permutation(len(others))
        return [lead] + [others[int(order[j % len(others)])] for j in range(self.siblings - 1)], rng

    def rule(self, index: int) -> FewshotRule:
        """The rule of task ``index``."""
        if self.siblings == 1:
            return self._lead_rule(index)
        group, member = divmod(int(index), self.siblings)
        return self._group_rules(group)[0][member]

    def __getitem__(self, index: int) -> ArcTask:
        index = int(index)
        if index < 0:
            raise IndexError(f"a task stream has no task {index}")
        if self.siblings > 1:
            group, member = divmod(index, self.siblings)
            if self._group is None or self._group[0] != group:
                members, rng = self._group_rules(group)
                ids = [f"{self.prefix}{group * self.siblings + j:09d}" for j in range(self.siblings)]
                self._group = (group, _draw_sibling_tasks(members, rng, ids, self.n_demos, self.n_test,
                                                          self.min_side, self.max_side, self.avoid))
            return self._group[1][member]
        rule = self.rule(index)
        rng = np.random.default_rng([self.seed, index, FRESH_TASK_STREAM])
        return _draw_task(rule, rng, f"{self.prefix}{index:09d}", self.n_demos, self.n_test, self.min_side,
                          self.max_side, self.avoid)


def explaining_rules(task: ArcTask, rules: Sequence[FewshotRule]) -> list[FewshotRule]:
    """The rules among ``rules`` that map every input of ``task`` with a known output (demos and tests) to that
    output. A task of one split that a rule of the other split explains would leak that rule across the split (or
    test a rule training already showed), so :func:`make_rule_tasks` and :class:`RuleTaskStream` redraw such tasks.

    Fast: the colour ``c`` of a rule only paints the cells its operation ``s`` chose, so each (family, s) is applied
    once per grid, painting a sentinel colour, and the sentinel is replaced by each candidate's ``c``.
    """
    candidates = list(rules)
    for inp, out in (*task.train, *task.test):
        if out is None:
            continue
        painted: dict[tuple[str, int], np.ndarray | None] = {}
        survivors = []
        for rule in _could_explain(candidates, inp, out):
            op = (rule.family, rule.s)
            if op not in painted:
                try:
                    painted[op] = np.asarray(_APPLY[rule.family](np.asarray(inp, dtype=np.uint8), rule.s, _SENTINEL))
                except ValueError:  # a grid outside the rule's family (e.g. no object for `size`)
                    painted[op] = None
            grid = painted[op]
            if grid is not None and grid.shape == out.shape and np.array_equal(
                    np.where(grid == _SENTINEL, rule.c, grid), out):
                survivors.append(rule)
        candidates = survivors
        if not candidates:
            break
    return candidates


def _could_explain(rules: list[FewshotRule], inp: np.ndarray, out: np.ndarray) -> list[FewshotRule]:
    """The rules that pass a necessary test for ``inp -> out`` (a cheap filter before applying them): only ``tile``
    and ``dihedral`` (a transpose) change a grid's shape, and every other rule writes its colour ``c`` (or,
    ``dihedral`` and ``gravity``, the background) into the cells it changes."""
    if out.shape != inp.shape:
        return [r for r in rules if r.family in ("tile", "dihedral")]
    changed = out[out != inp]
    if changed.size == 0:
        return [r for r in rules if r.family != "tile"]
    colours = np.unique(changed[changed != 0])
    if colours.size > 1:
        return []
    if colours.size == 1:
        return [r for r in rules if r.family != "tile" and r.c == int(colours[0])]
    return [r for r in rules if r.family in ("dihedral", "gravity")]  # cells only cleared: a shape moved


_SENTINEL = NUM_DRAWING_COLOURS + 1  # not a grid colour: marks the cells a rule paints in its colour c
