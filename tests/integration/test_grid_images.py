"""GridImages: the pure renderer pixel by pixel, and the images a tiny fit writes to TensorBoard."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from callbacks import GridImages
from callbacks.grid_images import (
    CAPTION_HEIGHT, PALETTE, RIGHT_FRAME, WRONG_FRAME, panel_margin, render_episode, render_rows,
)
from trm_lightning.data.episodes import EpisodeDataset, EpisodeKey
from trm_lightning.data.tokenize import grid_to_canvas
from trm_lightning.vocab import IGNORE_LABEL
from tests.integration.helpers import run_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py




def _mask(image: np.ndarray, colour) -> np.ndarray:
    return (image == np.asarray(colour, dtype=np.uint8)).all(-1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the True pixels."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


# --------------------------------------------------------------------------------------------- renderer
def test_palette_is_the_arc_palette():
    hex_codes = ["000000", "0074D9", "FF4136", "2ECC40", "FFDC00", "AAAAAA", "F012BE", "FF851B", "7FDBFF", "870C25"]
    assert [bytes(c).hex().upper() for c in PALETTE] == hex_codes


@pytest.mark.parametrize("cp", [1, 3, 8])
def test_known_cell_gets_its_palette_colour(cp):
    demo_in = np.array([[0, 1, 2], [3, 4, 5]])
    demo_out = np.array([[6, 7], [8, 9]])
    query, target = np.array([[1]]), np.array([[2, 2]])
    image = render_episode([(demo_in, demo_out)], query, target, target, cell_pixels=cp)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    m = panel_margin(cp)
    for r in range(2):
        for c in range(3):
            # the top-left pixel of each cell is never a grid line
            assert tuple(image[m + r * cp, m + c * cp]) == tuple(PALETTE[demo_in[r, c]]), (r, c)
    assert image.shape[0] == 2 * m + 2 * cp  # panels as tall as the tallest grid (2 cells)


def test_wrong_size_prediction_is_a_differently_sized_block_in_a_wrong_frame():
    cp = 8
    demo = (np.zeros((2, 2), int), np.ones((2, 2), int))
    query = np.full((3, 3), 5)
    target = np.full((3, 3), 4)  # yellow, nowhere else
    prediction = np.full((2, 4), 6)  # magenta, nowhere else
    image = render_episode([demo], query, target, prediction, cell_pixels=cp)
    # grid lines take the last pixel row/column of each cell, the block spans to the last cell's line
    _, t_left, t_h, t_w = _bbox(_mask(image, PALETTE[4]))
    p_top, p_left, p_h, p_w = _bbox(_mask(image, PALETTE[6]))
    assert (t_h, t_w) == (3 * cp - 1, 3 * cp - 1)
    assert (p_h, p_w) == (2 * cp - 1, 4 * cp - 1)
    assert p_left > t_left  # the prediction comes after the target
    m = panel_margin(cp)
    assert p_top == m
    # the margin around the prediction is the "wrong" frame, on all four sides, and nothing is "right"
    wrong = _mask(image, WRONG_FRAME)
    panel = wrong[:, p_left - m :]
    assert panel[:m].all() and panel[-m:].all() and panel[:, :m].all() and panel[:, -m:].all()
    assert not _mask(image, RIGHT_FRAME).any()
    assert tuple(image[0, -1]) == tuple(WRONG_FRAME)


def test_exact_prediction_gets_the_right_frame_and_an_empty_one_a_wrong_frame():
    target = np.array([[1, 2], [3, 4]])
    right = render_episode([], np.array([[7]]), target, target.copy(), cell_pixels=4)
    assert tuple(right[0, -1]) == tuple(RIGHT_FRAME) and not _mask(right, WRONG_FRAME).any()
    # same colours, other size: wrong
    assert tuple(render_episode([], np.array([[7]]), target, target[:1], cell_pixels=4)[0, -1]) == tuple(WRONG_FRAME)
    # nothing readable on the predicted canvas: an empty panel, wrong
    empty = render_episode([], np.array([[7]]), target, np.zeros((0, 0), np.uint8), cell_pixels=4)
    assert tuple(empty[0, -1]) == tuple(WRONG_FRAME)
    # unknown answer: no frame at all
    unknown = render_episode([], np.array([[7]]), None, target, cell_pixels=4)
    assert not _mask(unknown, WRONG_FRAME).any() and not _mask(unknown, RIGHT_FRAME).any()


def test_panel_cells_fix_the_image_size_whatever_the_prediction():
    target = np.full((2, 2), 3)
    shapes = {render_episode([], target, target, np.full(shape, 1), cell_pixels=4, panel_cells=6).shape
              for shape in [(1, 1), (2, 2), (6, 6), (0, 0)]}
    m = panel_margin(4)
    assert shapes == {(2 * m + 6 * 4, 3 * (2 * m + 6 * 4) + 2, 3)}  # three panels, two 1-px separators


class _Writer:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step):
        self.images.append((tag, image, step))


def test_rows_come_from_the_first_batch_when_the_dataset_lists_no_keys():
    """Without a keyed dataset: the first row of each distinct task of batch 0, drawn from the rollout's argmax."""
    side = 4
    tasks = [3, 3, 1, 3, 2]
    grids = [np.full((t, 2), t) for t in tasks]  # task t: a t x 2 grid of colour t
    canvases = torch.stack([torch.from_numpy(grid_to_canvas(g, side).astype(np.int64)) for g in grids])
    labels = canvases.clone()
    labels[labels == 0] = IGNORE_LABEL
    batch = {
        "demo_inputs": canvases[:, None], "demo_outputs": canvases[:, None],
        "demo_mask": torch.ones(len(tasks), 1, dtype=torch.bool), "inputs": canvases, "labels": labels,
        "task_index": torch.tensor(tasks),
    }

    class Model:
        def rollout(self, b):  # predicts the target exactly
            return SimpleNamespace(logits=torch.nn.functional.one_hot(b["inputs"].long(), 12).float())

    class Module:
        device = torch.device("cpu")
        model = Model()

    writer = _Writer()
    trainer = SimpleNamespace(
        val_dataloaders=None, sanity_checking=False, is_global_zero=True, global_step=7,
        precision_plugin=SimpleNamespace(val_step_context=contextlib.nullcontext),
        loggers=[SimpleNamespace(experiment=writer)],
    )
    callback = GridImages(num_tasks=2, every_n_validations=2, cell_pixels=2)
    other = {**batch, "task_index": torch.tensor([9] * 5)}
    for step, first in [(5, other), (7, batch), (9, other), (11, other)]:  # drawn at the 2nd and 4th only
        trainer.global_step = step
        callback.on_validation_epoch_start(trainer, Module())
        callback.on_validation_batch_end(trainer, Module(), None, first, 0, 0)
        callback.on_validation_batch_end(trainer, Module(), None, other, 1, 0)  # not batch 0: never kept
        callback.on_validation_epoch_end(trainer, Module())
    tags = [(tag, step) for tag, _, step in writer.images]
    assert tags == [("grids/task3", 7), ("grids/task1", 7), ("grids/task3", 11), ("grids/task1", 11)]  # rows fixed
    for (_, image, _), row in zip(writer.images, [0, 2]):
        assert image.dtype == np.uint8 and image.shape[0] == 3  # CHW
        hwc = image.transpose(1, 2, 0)[CAPTION_HEIGHT:]  # the panels, under the caption band
        m = panel_margin(2)
        assert tuple(hwc[m, m]) == tuple(PALETTE[tasks[row]])
        assert tuple(hwc[0, -1]) == tuple(RIGHT_FRAME)
        band = image.transpose(1, 2, 0)[:CAPTION_HEIGHT]
        assert (band == 255).all(axis=-1).mean() > 0.5 and (band < 128).all(axis=-1).any()  # white, with text


def test_constructor_rejects_bad_arguments():
    for kwargs in ({"num_tasks": 0}, {"every_n_validations": 0}, {"cell_pixels": 0}):
        with pytest.raises(ValueError):
            GridImages(**kwargs)


# ---------------------------------------------------------------------------------------- in a tiny fit
def test_tiny_fit_logs_one_image_per_task_per_validation(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_tiny(
        "fit", synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=4",
        "--trainer.callbacks+=callbacks.GridImages", "--trainer.callbacks.num_tasks=2",
    )
    assert cli.trainer.global_step == 4
    ea = EventAccumulator(str(cli.trainer.log_dir), size_guidance={"images": 0})
    ea.Reload()
    dm = cli.datamodule
    task_ids = [task.task_id for task in dm.eval_tasks[:2]]
    assert len(set(task_ids)) == 2
    assert sorted(t for t in ea.Tags()["images"] if t.startswith("grids/")) == sorted(f"grids/{t}" for t in task_ids)

    # the held-out rows the callback should draw: the first labelled test pair of each task, augmentation 0
    dataset = EpisodeDataset(dm.eval_tasks, dm.canvas_size, dm.max_demos, seed=dm.seed)
    rows = default_collate([dataset[EpisodeKey(t, dm.eval_tasks[t].labelled_test_indices[0], 0)] for t in range(2)])
    with torch.no_grad():
        predictions = cli.model.model.rollout(rows).logits.argmax(-1)
    expected = render_rows(rows, predictions, cell_pixels=8, captions=True)
    for task_id, image in zip(task_ids, expected):
        events = ea.Images(f"grids/{task_id}")
        assert [e.step for e in events] == [2, 4]
        assert all((e.height, e.width) == image.shape[:2] for e in events)
        # the last image was drawn with the final weights: it is exactly the independent rendering
        logged = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(logged, image)


def test_captions_name_each_panel_where_it_starts():
    grid = np.ones((3, 3), dtype=np.uint8)
    plain = render_episode([(grid, grid)], grid, grid, grid, cell_pixels=8, panel_cells=5)
    captioned = render_episode([(grid, grid)], grid, grid, grid, cell_pixels=8, panel_cells=5, captions=True)
    assert captioned.shape == (plain.shape[0] + CAPTION_HEIGHT, plain.shape[1], 3)
    np.testing.assert_array_equal(captioned[CAPTION_HEIGHT:], plain)  # the panels themselves do not move
    ink = (captioned[:CAPTION_HEIGHT] < 128).all(axis=-1).any(axis=0)  # columns with text
    panel = plain.shape[1] // 5  # five panels (demo in, demo out, query, target, prediction) and separators
    starts = [x for x in range(1, plain.shape[1]) if ink[x] and not ink[x - 1]]
    assert len(starts) >= 5 and starts[0] < panel
