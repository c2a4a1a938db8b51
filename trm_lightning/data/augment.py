"""Puzzle augmentations: dihedral transform x permutation of colours 1..9 (black stays), plus translation.

Indices below :data:`STRUCTURED_BASE` draw the dihedral transform and the colour map at random; indices from
:data:`STRUCTURED_BASE` on name them: ``STRUCTURED_BASE + 8 * c + t`` is dihedral transform ``t`` with colour
map ``c`` (``c = 0``: colours unchanged; ``c >= 1``: a random map drawn from ``(seed, task, c)``), which is
how evaluation asks for exactly the 8 dihedral versions, or 8 x k versions (:func:`structured_index`).

Augmentation ``i`` of task ``t`` is a pure function of ``(seed, t, i)``, so training, evaluation and voting
all agree on it without storing anything; index 0 is always the identity (the original puzzle).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

NUM_DIHEDRAL = 8
TRM_NUM_AUGMENTATIONS = 1000  # versions per test input that TRM's evaluation votes over
STRUCTURED_BASE = 1_000_000_000  # augmentation indices from here on name (colour map, dihedral) explicitly
_COLOUR_SALT = 0x636F6C72  # "colr": structured colour maps are independent of the random indices' draws
INVERSE_DIHEDRAL = (0, 3, 2, 1, 4, 5, 6, 7)
_TRANSLATION_SALT = 0x7472616E  # "tran": keeps offsets independent of the dihedral/colour draw


def dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    """Apply dihedral transform ``t``.

    0 identity, 1 rot90, 2 rot180, 3 rot270 (``np.rot90`` counter-clockwise), 4 fliplr, 5 flipud,
    6 transpose, 7 anti-transpose (``fliplr(rot90)``).
    """
    grid = np.asarray(grid)
    if t == 0:
        out = grid
    elif t == 1:
        out = np.rot90(grid, k=1)
    elif t == 2:
        out = np.rot90(grid, k=2)
    elif t == 3:
        out = np.rot90(grid, k=3)
    elif t == 4:
        out = np.fliplr(grid)
    elif t == 5:
        out = np.flipud(grid)
    elif t == 6:
        out = grid.T
    elif t == 7:
        out = np.fliplr(np.rot90(grid, k=1))
    else:
        raise ValueError(f"dihedral transform must be in 0..7, got {t}")
    return np.ascontiguousarray(out)


def inverse_dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    """Undo :func:`dihedral` with the same ``t``."""
    if not 0 <= t < NUM_DIHEDRAL:
        raise ValueError(f"dihedral transform must be in 0..7, got {t}")
    return dihedral(grid, INVERSE_DIHEDRAL[t])


@dataclass(frozen=True)
class Augmentation:
    """One version of a puzzle: recolour with ``colour_perm`` (``new = perm[old]``), then ``dihedral``.

    Attributes:
        dihedral: dihedral transform index, 0..7.
        colour_perm: permutation of 0..9 with ``colour_perm[0] == 0`` (black is never recoloured).
    """

    dihedral: int
    colour_perm: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.dihedral < NUM_DIHEDRAL:
            raise ValueError(f"dihedral transform must be in 0..7, got {self.dihedral}")
        perm = tuple(int(c) for c in self.colour_perm)
        if len(perm) != 10 or sorted(perm) != list(range(10)) or perm[0] != 0:
            raise ValueError(f"colour_perm must be a permutation of 0..9 fixing 0, got {self.colour_perm}")
        object.__setattr__(self, "colour_perm", perm)

    @classmethod
    def identity(cls) -> Augmentation:
        return cls(0, tuple(range(10)))

    def _perm(self) -> np.ndarray:
        return np.asarray(self.colour_perm, dtype=np.uint8)

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """Augment a grid of colours 0..9 (recolour, then the dihedral transform)."""
        return dihedral(self._perm()[np.asarray(grid)], self.dihedral)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """Map an augmented grid (for example a prediction) back to the original puzzle's frame."""
        inverse_perm = np.argsort(self._perm()).astype(np.uint8)
        return inverse_perm[inverse_dihedral(np.asarray(grid), self.dihedral)]


def _task_key(task_id: str) -> int:
    return zlib.crc32(task_id.encode("utf-8"))


def structured_index(dihedral_t: int, colour_map: int) -> int:
    """The augmentation index of dihedral transform ``dihedral_t`` with colour map ``colour_map`` (0 = colours
    unchanged); ``(0, 0)`` is index 0, the original puzzle."""
    if not 0 <= dihedral_t < NUM_DIHEDRAL or colour_map < 0:
        raise ValueError(f"need 0 <= dihedral_t < 8 and colour_map >= 0, got {dihedral_t}, {colour_map}")
    if dihedral_t == 0 and colour_map == 0:
        return 0
    return STRUCTURED_BASE + NUM_DIHEDRAL * colour_map + dihedral_t


def augmentation_for(seed: int, task_id: str, aug_index: int) -> Augmentation:
    """Augmentation number ``aug_index`` of ``task_id``: a pure function of its arguments; 0 is the identity."""
    if aug_index == 0:
        return Augmentation.identity()
    if aug_index >= STRUCTURED_BASE:
        colour_map, t = divmod(aug_index - STRUCTURED_BASE, NUM_DIHEDRAL)
        if colour_map == 0:
            return Augmentation(t, tuple(range(10)))
        rng = np.random.default_rng([seed, _task_key(task_id), colour_map, _COLOUR_SALT])
        return Augmentation(t, (0, *(int(c) + 1 for c in rng.permutation(9))))
    rng = np.random.default_rng([seed, _task_key(task_id), aug_index])
    t = int(rng.integers(0, NUM_DIHEDRAL))
    colours = rng.permutation(9) + 1
    return Augmentation(t, (0, *(int(c) for c in colours)))


def translation_for(
    seed: int, task_id: str, aug_index: int, max_h: int, max_w: int, canvas_size: int
) -> tuple[int, int]:
    """Top-left offset (row, column) shared by every grid of one puzzle version; ``(0, 0)`` for index 0.

    Rows are uniform in ``0..canvas_size - max_h`` and columns in ``0..canvas_size - max_w``, so the
    largest grid still fits.
    """
    if max_h > canvas_size or max_w > canvas_size:
        raise ValueError(f"a {max_h}x{max_w} grid does not fit a canvas of side {canvas_size}")
    if aug_index == 0:
        return (0, 0)
    rng = np.random.default_rng([seed, _task_key(task_id), aug_index, _TRANSLATION_SALT])
    row = int(rng.integers(0, canvas_size - max_h + 1))
    col = int(rng.integers(0, canvas_size - max_w + 1))
    return (row, col)


def evaluation_augmentations(mode: str | int, *, start: int = 1) -> list[int]:
    """Augmentation indices for each evaluation query: index 0 (the original) first.

    Args:
        mode: ``"identity"`` (or ``"none"``): ``[0]``; ``"dihedral"``: the 8 dihedral transforms, colours
            unchanged; ``"dihedral_x<k>"`` (e.g. ``dihedral_x4``): the 8 dihedral transforms under each of ``k``
            colour maps, the first being the identity (8k versions); an integer ``n`` (or its string): the
            original plus ``n - 1`` random versions (random dihedral transform and colour map each); ``"trm"``:
            TRM's 1000 random versions.
        start: first index of the random versions (the puzzle-id baseline has vectors for indices below
            ``num_train_augmentations`` only).
    """
    if isinstance(mode, bool):
        raise ValueError(f"evaluation augmentations: unknown mode {mode!r}")
    if start < 1:
        raise ValueError(f"evaluation augmentations: start must be >= 1, got {start}")
    if isinstance(mode, str):
        name = mode.strip().lower()
        if name in ("identity", "none"):
            n = 1
        elif name == "trm":
            n = TRM_NUM_AUGMENTATIONS
        elif name == "dihedral" or name.startswith("dihedral_x"):
            k = 1 if name == "dihedral" else name[len("dihedral_x"):]
            if not str(k).isdigit() or int(k) < 1:
                raise ValueError(f"evaluation augmentations: {mode!r} needs a count of colour maps >= 1, e.g. dihedral_x4")
            return [structured_index(t, c) for c in range(int(k)) for t in range(NUM_DIHEDRAL)]
        elif name.isdigit():
            n = int(name)
        else:
            raise ValueError(
                f"evaluation augmentations: unknown mode {mode!r} (identity, dihedral, dihedral_x<k>, trm, or a count)"
            )
    elif isinstance(mode, int):
        n = mode
    else:
        raise ValueError(f"evaluation augmentations: unknown mode {mode!r}")
    if n < 1:
        raise ValueError(f"evaluation augmentations: need at least 1, got {n}")
    return [0, *range(start, start + n - 1)]
