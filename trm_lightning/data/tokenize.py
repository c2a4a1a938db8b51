"""Grids <-> canvas tokens, as TRM lays them out (reference trm.md sections 5.1 and 6.1).

A grid of colours 0..9 is written onto a square canvas of side ``S`` (row-major, ``S * S`` tokens):
colour ``c`` becomes token ``c + 2``; the row just below the grid and the column just right of it carry
``EOS`` (only where they fall inside the canvas, and never at the corner); everything else is ``PAD``.
The model therefore "declares" the size of its answer with the EOS/PAD border, and :func:`crop_canvas`
reads it back.
"""

from __future__ import annotations

import numpy as np

from trm_lightning.vocab import COLOR_OFFSET, EOS, IGNORE_LABEL, NUM_COLOURS, PAD

_FIRST_COLOUR = COLOR_OFFSET
_LAST_COLOUR = COLOR_OFFSET + NUM_COLOURS - 1


def grid_to_canvas(grid: np.ndarray, canvas_size: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Write ``grid`` onto a ``canvas_size x canvas_size`` canvas at ``offset`` (row, column).

    Returns:
        uint8 array of shape ``[canvas_size * canvas_size]``, row-major.

    Raises:
        ValueError: the grid is not 2-D or does not fit the canvas at that offset.
    """
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise ValueError(f"expected a 2-D grid, got shape {grid.shape}")
    height, width = grid.shape
    row, col = int(offset[0]), int(offset[1])
    if row < 0 or col < 0 or row + height > canvas_size or col + width > canvas_size:
        raise ValueError(
            f"a {height}x{width} grid at offset ({row}, {col}) does not fit a canvas of side {canvas_size}"
        )
    canvas = np.full((canvas_size, canvas_size), PAD, dtype=np.uint8)
    canvas[row : row + height, col : col + width] = grid.astype(np.uint8) + COLOR_OFFSET
    if row + height < canvas_size:
        canvas[row + height, col : col + width] = EOS
    if col + width < canvas_size:
        canvas[row : row + height, col + width] = EOS
    return canvas.reshape(-1)


def _as_numpy(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):  # a torch tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def crop_canvas(tokens) -> np.ndarray:
    """Read the grid back from canvas tokens (TRM's ``_crop``, reference trm.md section 6.1).

    Rows are scanned from the top. For each row, count its leading valid colour tokens (2..11); the count
    can only shrink from row to row, and the scan stops at the first row whose count is 0. The kept grid is
    the ``rows x cols`` rectangle of largest area (the first one on ties).

    Args:
        tokens: ``S * S`` tokens (or an ``S x S`` array), numpy or torch.

    Returns:
        uint8 grid of colours 0..9; shape ``(0, 0)`` when the canvas starts with no colour token.
    """
    flat = _as_numpy(tokens).reshape(-1)
    side = int(round(np.sqrt(flat.size)))
    if side * side != flat.size:
        raise ValueError(f"{flat.size} tokens do not form a square canvas")
    canvas = flat.reshape(side, side).astype(np.int64)
    valid = (canvas >= _FIRST_COLOUR) & (canvas <= _LAST_COLOUR)
    # leading valid tokens per row: index of the first invalid token, or the side when all are valid
    leading = np.where(valid.all(axis=1), side, np.argmin(valid, axis=1))
    counts = np.minimum.accumulate(leading)
    zero_rows = np.flatnonzero(counts == 0)
    usable = int(zero_rows[0]) if zero_rows.size else side
    if usable == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    areas = counts[:usable] * np.arange(1, usable + 1)
    best = int(np.argmax(areas))
    rows, cols = best + 1, int(counts[best])
    return (canvas[:rows, :cols] - COLOR_OFFSET).astype(np.uint8)


def canvas_labels(tokens) -> np.ndarray:
    """Training labels for canvas tokens: int64 copy with PAD positions set to ``IGNORE_LABEL``.

    EOS and colour tokens stay supervised, so the model learns where the answer ends.
    """
    labels = _as_numpy(tokens).astype(np.int64)
    labels[labels == PAD] = IGNORE_LABEL
    return labels
