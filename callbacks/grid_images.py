"""GridImages: pictures of a few held-out episodes and the model's answers, in TensorBoard.

For the first ``num_tasks`` distinct tasks of validation dataloader 0 (``val``, the held-out tasks) one row
each is fixed at the first validation (the first row of each task in the loader's order: with the
datamodule, the first labelled test pair, augmentation 0) and kept for the whole run. After every
``every_n_validations``-th validation (sanity checks do not count) those rows go through
``pl_module.model.rollout`` and one image per task is logged as ``grids/<task_id>`` at ``trainer.global_step``.

An image is one strip (see :func:`render_episode`)::

    demo 1 in | demo 1 out || demo 2 in | demo 2 out || ... || query in | target | prediction

with those captions written in a band above the panels.

Each grid is cropped from its canvas (:func:`~trm_lightning.data.tokenize.crop_canvas`) and drawn at its own
size, top-left aligned, on a white panel of the canvas's size, so a prediction of the wrong size shows as a
block of another size and a task's image keeps its size from one validation to the next. The prediction's
panel has a green frame when it equals the target exactly and a red frame otherwise.

The rows are chosen from the loader's dataset when it lists its episode keys (the datamodule's
``KeyedEpisodes``), so every rank holds the same rows whether or not it sees them; otherwise from the
first validation batch of each rank. Every rank that holds rows runs the rollout (symmetric, so sharded
strategies are safe); only rank 0 renders and writes, with no collective inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import default_collate

from trm_lightning.checks import check_at_least
from trm_lightning.data.tokenize import crop_canvas
from trm_lightning.vocab import IGNORE_LABEL, PAD

# ARC colours 0..9: black, blue, red, green, yellow, grey, magenta, orange, light blue, maroon
PALETTE = np.array(
    [
        (0x00, 0x00, 0x00),
        (0x00, 0x74, 0xD9),
        (0xFF, 0x41, 0x36),
        (0x2E, 0xCC, 0x40),
        (0xFF, 0xDC, 0x00),
        (0xAA, 0xAA, 0xAA),
        (0xF0, 0x12, 0xBE),
        (0xFF, 0x85, 0x1B),
        (0x7F, 0xDB, 0xFF),
        (0x87, 0x0C, 0x25),
    ],
    dtype=np.uint8,
)
# drawing colours outside the palette
BACKGROUND = np.array((255, 255, 255), dtype=np.uint8)  # panels: where no grid cell is
GRID_LINE = np.array((85, 85, 85), dtype=np.uint8)  # 1 px between cells when cells are >= 4 px
THIN_SEPARATOR = np.array((200, 200, 200), dtype=np.uint8)  # inside a pair / the query section
GROUP_SEPARATOR = np.array((96, 96, 96), dtype=np.uint8)  # between pairs, and before the query
RIGHT_FRAME = np.array((0, 200, 0), dtype=np.uint8)  # prediction == target exactly
WRONG_FRAME = np.array((255, 0, 0), dtype=np.uint8)  # any other prediction


def panel_margin(cell_pixels: int) -> int:
    """Pixels between a panel's edge and its grid (the prediction's frame fills them): ``max(1, cell_pixels // 2)``."""
    return max(1, cell_pixels // 2)


def _as_grid(grid, what: str) -> np.ndarray:
    if hasattr(grid, "detach"):
        grid = grid.detach().cpu().numpy()
    grid = np.asarray(grid)
    if grid.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    if grid.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D grid, got shape {grid.shape}")
    if grid.min() < 0 or grid.max() > 9:
        raise ValueError(f"{what}: colours must be in 0..9, got {grid.min()}..{grid.max()}")
    return grid.astype(np.int64)


def _draw_grid(panel: np.ndarray, grid: np.ndarray, cell_pixels: int, margin: int) -> None:
    """Paint ``grid`` into ``panel`` (in place) with its top-left cell at (margin, margin)."""
    h, w = grid.shape
    if h == 0 or w == 0:
        return
    block = PALETTE[grid].repeat(cell_pixels, axis=0).repeat(cell_pixels, axis=1)
    if cell_pixels >= 4:
        block[cell_pixels - 1 :: cell_pixels, :] = GRID_LINE
        block[:, cell_pixels - 1 :: cell_pixels] = GRID_LINE
    panel[margin : margin + h * cell_pixels, margin : margin + w * cell_pixels] = block


def render_episode(
    demo_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    query: np.ndarray,
    target: np.ndarray | None,
    prediction: np.ndarray,
    cell_pixels: int = 8,
    panel_cells: int = 0,
    captions: bool = False,
) -> np.ndarray:
    """One episode as an RGB image ``(H, W, 3)`` uint8: demos, query, target and prediction side by side.

    Left to right: each demo's input and output, then the query input, the target and the prediction.
    Every grid sits in a panel of the same size (the largest height and width over all grids and
    ``panel_cells``, in cells, ``cell_pixels`` each, plus :func:`panel_margin` on every side) at its own size,
    top-left aligned, on ``BACKGROUND``. Panels are separated by ``max(1, cell_pixels // 8)`` px of
    ``THIN_SEPARATOR`` inside a demo pair and in the query section, and by four times that of
    ``GROUP_SEPARATOR`` between groups. The first panel starts at x = 0, so the first demo input's cell
    (r, c) covers rows ``m + r*cp .. m + (r+1)*cp - 1`` and the matching columns (``m`` the margin, ``cp`` =
    ``cell_pixels``; with ``cp >= 4`` the last row and column of each cell are ``GRID_LINE``).

    The prediction's margin is painted ``RIGHT_FRAME`` when it equals the target (same shape, same colours)
    and ``WRONG_FRAME`` otherwise; with no target (answer unknown) it stays plain.

    Args:
        demo_pairs: ``(input, output)`` grids of colours 0..9.
        query: the query input grid.
        target: the expected output grid, or None when it is unknown.
        prediction: the predicted grid; ``(0, 0)`` (nothing readable on the canvas) draws an empty panel.
        cell_pixels: side of one cell in pixels.
        panel_cells: the least panel side in cells; the canvas side keeps the image's size the same whatever
            the prediction's size (the callback passes it, so TensorBoard's step slider does not jump).
        captions: add a band of :data:`CAPTION_HEIGHT` px above the strip naming each panel (``demo 1 in``,
            ``demo 1 out``, ..., ``query``, ``target``, ``prediction``; shorter forms where a panel is narrow).
    """
    if cell_pixels < 1:
        raise ValueError(f"cell_pixels must be >= 1, got {cell_pixels}")
    demos = [(_as_grid(i, f"demo {k} input"), _as_grid(o, f"demo {k} output")) for k, (i, o) in enumerate(demo_pairs)]
    query = _as_grid(query, "query")
    target = None if target is None else _as_grid(target, "target")
    prediction = _as_grid(prediction, "prediction")

    grids = [g for pair in demos for g in pair] + [query, prediction] + ([] if target is None else [target])
    rows = max(1, panel_cells, max(g.shape[0] for g in grids))
    cols = max(1, panel_cells, max(g.shape[1] for g in grids))
    margin = panel_margin(cell_pixels)
    panel_h, panel_w = 2 * margin + rows * cell_pixels, 2 * margin + cols * cell_pixels
    thin = max(1, cell_pixels // 8)

    def panel(grid: np.ndarray | None, frame: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((panel_h, panel_w, 3), dtype=np.uint8)
        out[:] = BACKGROUND
        if frame is not None:
            out[:margin], out[-margin:], out[:, :margin], out[:, -margin:] = frame, frame, frame, frame
        if grid is not None:
            _draw_grid(out, grid, cell_pixels, margin)
        return out

    def separator(width: int, colour: np.ndarray) -> np.ndarray:
        out = np.empty((panel_h, width, 3), dtype=np.uint8)
        out[:] = colour
        return out

    frame = None
    if target is not None:
        right = prediction.shape == target.shape and bool(np.array_equal(prediction, target))
        frame = RIGHT_FRAME if right else WRONG_FRAME
    strip: list[np.ndarray] = []
    labels: list[tuple[int, tuple[str, ...]]] = []  # (x of a panel, its caption from longest to shortest)

    def add(piece: np.ndarray, caption: tuple[str, ...] | None = None) -> None:
        if caption is not None:
            labels.append((sum(p.shape[1] for p in strip), caption))
        strip.append(piece)

    for k, (inp, out) in enumerate(demos, start=1):
        add(panel(inp), (f"demo {k} in", f"in {k}", f"{k}"))
        add(separator(thin, THIN_SEPARATOR))
        add(panel(out), (f"demo {k} out", f"out {k}", f"{k}'"))
        add(separator(4 * thin, GROUP_SEPARATOR))
    add(panel(query), ("query", "q"))
    add(separator(thin, THIN_SEPARATOR))
    add(panel(target), ("target", "t"))
    add(separator(thin, THIN_SEPARATOR))
    add(panel(prediction, frame), ("prediction", "pred", "p"))
    image = np.concatenate(strip, axis=1)
    return _with_captions(image, labels, panel_w) if captions else image


CAPTION_HEIGHT = 12  # px of the caption band


def _with_captions(image: np.ndarray, labels: list[tuple[int, tuple[str, ...]]], panel_width: int) -> np.ndarray:
    """``image`` under a white band in which each panel's caption (the longest form that fits) is written."""
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (image.shape[1], CAPTION_HEIGHT), (255, 255, 255))
    draw, font = ImageDraw.Draw(band), ImageFont.load_default()
    for x, forms in labels:
        text = next((f for f in forms if draw.textlength(f, font=font) <= panel_width), forms[-1])
        draw.text((x + 1, 0), text, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(band, dtype=np.uint8), image], axis=0)


def _target_grid(labels: Tensor) -> np.ndarray | None:
    """The target grid of one row's labels (-100 at PAD), or None when no cell is supervised."""
    supervised = labels != IGNORE_LABEL
    if not bool(supervised.any()):
        return None
    return crop_canvas(torch.where(supervised, labels, torch.full_like(labels, PAD)))


def render_rows(rows: dict[str, Tensor], predictions: Tensor, cell_pixels: int = 8,
                captions: bool = False) -> list[np.ndarray]:
    """:func:`render_episode` for each row of a collated episode batch, ``predictions`` (B, S*S) canvas tokens.

    Panels are ``S`` cells a side (the canvas), so a row's image has the same size at every validation.
    """
    side = int(round(rows["inputs"].shape[-1] ** 0.5))
    images = []
    for i in range(rows["inputs"].shape[0]):
        slots = torch.nonzero(rows["demo_mask"][i]).flatten().tolist()
        demos = [(crop_canvas(rows["demo_inputs"][i, k]), crop_canvas(rows["demo_outputs"][i, k])) for k in slots]
        images.append(
            render_episode(
                demos, crop_canvas(rows["inputs"][i]), _target_grid(rows["labels"][i]),
                crop_canvas(predictions[i]), cell_pixels, panel_cells=side, captions=captions,
            )
        )
    return images


def _task_id(dataset, task_index: int) -> str:
    """The task's id when the dataset knows its tasks (``KeyedEpisodes`` -> ``EpisodeDataset.tasks``)."""
    tasks = getattr(getattr(dataset, "episodes", dataset), "tasks", None)
    try:
        return str(tasks[task_index].task_id)
    except (TypeError, IndexError, AttributeError):
        return f"task{task_index}"


class GridImages(Callback):
    """Logs ``grids/<task_id>`` images of a few fixed held-out episodes with the model's predictions.

    Args:
        num_tasks: how many distinct tasks of validation dataloader 0 to draw (one row each).
        every_n_validations: draw after every this-many-th validation (sanity checks do not count).
        cell_pixels: side of one grid cell in pixels.
    """

    def __init__(self, num_tasks: int = 4, every_n_validations: int = 1, cell_pixels: int = 8) -> None:
        for name, value in (("num_tasks", num_tasks), ("every_n_validations", every_n_validations),
                            ("cell_pixels", cell_pixels)):
            check_at_least(f"GridImages.{name}", value, 1)
        self.num_tasks = num_tasks
        self.every_n_validations = every_n_validations
        self.cell_pixels = cell_pixels
        self._validations = 0
        self._due = False
        self._rows: dict[str, Tensor] | None = None  # collated CPU rows, fixed once chosen
        self._task_ids: list[str] = []
        self._warned = False

    # ------------------------------------------------------------------------------------ the rows
    def _choose(self, dataset, task_indices: Sequence[int]) -> list[int]:
        """Positions of the first row of each of the first ``num_tasks`` distinct tasks."""
        first: dict[int, int] = {}
        for position, task in enumerate(task_indices):
            if int(task) not in first:
                first[int(task)] = position
                if len(first) == self.num_tasks:
                    break
        self._task_ids = [_task_id(dataset, t) for t in first]
        return list(first.values())

    def _rows_from_dataset(self, trainer: Trainer) -> dict[str, Tensor] | None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        keys = getattr(dataset, "keys", None)
        if not isinstance(keys, (list, tuple)) or not all(hasattr(k, "task_index") for k in keys):
            return None
        positions = self._choose(dataset, [k.task_index for k in keys])
        return default_collate([dataset[p] for p in positions]) if positions else None

    def _rows_from_batch(self, trainer: Trainer, batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        positions = self._choose(getattr(loader, "dataset", None), batch["task_index"].tolist())
        if not positions:
            return None
        index = torch.tensor(positions, device=batch["task_index"].device)
        return {k: v.index_select(0, index).cpu().clone() for k, v in batch.items() if isinstance(v, Tensor)}

    # ------------------------------------------------------------------------------------- hooks
    @property
    def state_key(self) -> str:
        """Unique per configuration, so two of these callbacks in one run each keep their own checkpointed state."""
        return self._generate_state_key(num_tasks=self.num_tasks, every_n_validations=self.every_n_validations)

    def state_dict(self) -> dict:
        return {"validations": self._validations}  # a resumed run keeps the every-n-th validation rhythm

    def load_state_dict(self, state_dict: dict) -> None:
        self._validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._due = False
        if trainer.sanity_checking:
            return
        self._validations += 1
        self._due = self._validations % self.every_n_validations == 0
        if self._due and self._rows is None:
            self._rows = self._rows_from_dataset(trainer)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._due and self._rows is None and dataloader_idx == 0 and batch_idx == 0:
            self._rows = self._rows_from_batch(trainer, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._due or self._rows is None:
            return
        self._due = False
        batch = {k: v.to(pl_module.device) for k, v in self._rows.items()}
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            logits = pl_module.model.rollout(batch).logits
        predictions = logits.argmax(-1).cpu()
        if not trainer.is_global_zero:  # rendering and writing only below: no collective
            return
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]
        if not writers:
            if not self._warned:
                rank_zero_warn("GridImages: no logger can take images (use a TensorBoardLogger); nothing is drawn")
                self._warned = True
            return
        for task_id, image in zip(self._task_ids, render_rows(self._rows, predictions, self.cell_pixels, captions=True)):
            chw = np.ascontiguousarray(image.transpose(2, 0, 1))
            for writer in writers:
                writer.add_image(f"grids/{task_id}", chw, trainer.global_step)
