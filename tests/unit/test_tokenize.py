import numpy as np
import pytest
import torch

from trm_lightning.data.tokenize import canvas_labels, crop_canvas, grid_to_canvas
from trm_lightning.vocab import COLOR_OFFSET, EOS, IGNORE_LABEL, PAD, VOCAB_SIZE


def test_constants():
    assert (PAD, EOS, COLOR_OFFSET, VOCAB_SIZE, IGNORE_LABEL) == (0, 1, 2, 12, -100)


@pytest.mark.parametrize("canvas_size", [8, 30])
def test_round_trip_random_grids(canvas_size):
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, canvas_size + 1, size=2)
        grid = rng.integers(0, 10, size=(h, w)).astype(np.uint8)
        tokens = grid_to_canvas(grid, canvas_size)
        assert tokens.dtype == np.uint8 and tokens.shape == (canvas_size * canvas_size,)
        assert tokens.max() < VOCAB_SIZE
        np.testing.assert_array_equal(crop_canvas(tokens), grid)


def test_eos_border_exact():
    grid = np.array([[0, 5, 9], [3, 0, 1]], dtype=np.uint8)
    expected = np.array(
        [
            [2, 7, 11, 1, 0],
            [5, 2, 3, 1, 0],
            [1, 1, 1, 0, 0],  # no corner token
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(grid_to_canvas(grid, 5), expected.reshape(-1))


def test_offset_placement_exact():
    grid = np.array([[4]], dtype=np.uint8)
    canvas = grid_to_canvas(grid, 4, offset=(1, 2)).reshape(4, 4)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[1, 2] = 6
    expected[2, 2] = EOS
    expected[1, 3] = EOS
    np.testing.assert_array_equal(canvas, expected)


def test_border_left_out_where_canvas_ends():
    grid = np.ones((2, 4), dtype=np.uint8)
    canvas = grid_to_canvas(grid, 4).reshape(4, 4)  # full width: no EOS column
    np.testing.assert_array_equal(canvas[:2], np.full((2, 4), 3))
    np.testing.assert_array_equal(canvas[2], np.full(4, EOS))
    assert (canvas[3] == PAD).all()


def test_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        grid_to_canvas(np.zeros((3, 3), dtype=np.uint8), 5, offset=(3, 0))
    with pytest.raises(ValueError):
        grid_to_canvas(np.zeros((6, 1), dtype=np.uint8), 5)


def test_crop_full_30x30():
    grid = np.random.default_rng(1).integers(0, 10, size=(30, 30)).astype(np.uint8)
    tokens = grid_to_canvas(grid, 30)
    assert EOS not in tokens and PAD not in tokens
    np.testing.assert_array_equal(crop_canvas(tokens), grid)


def test_crop_empty_and_torch_input():
    assert crop_canvas(np.zeros(25, dtype=np.uint8)).shape == (0, 0)
    grid = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.uint8)
    tokens = torch.from_numpy(grid_to_canvas(grid, 6).astype(np.int64))
    np.testing.assert_array_equal(crop_canvas(tokens), grid)
    cropped = crop_canvas(tokens.reshape(6, 6))
    assert cropped.dtype == np.uint8 and cropped.shape == (3, 2)


def test_crop_keeps_max_area_rectangle():
    # leading valid counts per row 4, 1, 1, 1, 1 -> areas 4, 2, 3, 4, 5 -> 5 x 1
    canvas = np.zeros((6, 6), dtype=np.int64)
    canvas[0, :4] = 3
    canvas[1:5, 0] = 4
    np.testing.assert_array_equal(crop_canvas(canvas), np.array([[1], [2], [2], [2], [2]]))
    # counts can only shrink: 2 then 4 gives 2 x 2; the scan stops at the first empty row
    canvas = np.zeros((6, 6), dtype=np.int64)
    canvas[0, :2] = 5
    canvas[1, :4] = 6
    canvas[3, :6] = 7  # after an empty row: ignored
    np.testing.assert_array_equal(crop_canvas(canvas), np.array([[3, 3], [4, 4]]))
    # tokens above 11 are not colours
    canvas = np.zeros((4, 4), dtype=np.int64)
    canvas[0, :3] = [2, 12, 2]
    np.testing.assert_array_equal(crop_canvas(canvas), np.array([[0]]))


def test_canvas_labels():
    tokens = grid_to_canvas(np.array([[0, 7]], dtype=np.uint8), 3)
    labels = canvas_labels(tokens)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [2, 9, 1, 1, 1, -100, -100, -100, -100])
    assert tokens[5] == PAD  # the input is not modified
