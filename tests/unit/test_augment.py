import numpy as np
import pytest

from trm_lightning.data.augment import (
    INVERSE_DIHEDRAL,
    Augmentation,
    augmentation_for,
    dihedral,
    inverse_dihedral,
    translation_for,
)

GRID = np.arange(12, dtype=np.uint8).reshape(3, 4) % 10


def test_dihedral_definitions():
    g = GRID
    expected = [
        g,
        np.rot90(g, 1),
        np.rot90(g, 2),
        np.rot90(g, 3),
        np.fliplr(g),
        np.flipud(g),
        g.T,
        np.rot90(g, 2).T,  # anti-transpose: [i, j] -> [W-1-j, H-1-i]
    ]
    for t, want in enumerate(expected):
        np.testing.assert_array_equal(dihedral(g, t), want)
    # the 8 transforms are distinct on an asymmetric grid
    assert len({dihedral(g, t).tobytes() + bytes(dihedral(g, t).shape) for t in range(8)}) == 8
    with pytest.raises(ValueError):
        dihedral(g, 8)


def test_inverse_table():
    assert INVERSE_DIHEDRAL == (0, 3, 2, 1, 4, 5, 6, 7)
    for t in range(8):
        np.testing.assert_array_equal(inverse_dihedral(dihedral(GRID, t), t), GRID)


def test_every_dihedral_and_colour_perm_inverts():
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 10, size=(4, 7)).astype(np.uint8)
    perms = [tuple(range(10)), (0, 9, 8, 7, 6, 5, 4, 3, 2, 1)]
    perms += [(0, *(int(c) for c in rng.permutation(9) + 1)) for _ in range(4)]
    for t in range(8):
        for perm in perms:
            aug = Augmentation(t, perm)
            out = aug.apply(grid)
            assert out.dtype == np.uint8
            assert out.shape == (grid.shape if t in (0, 2, 4, 5) else grid.shape[::-1])
            np.testing.assert_array_equal(aug.invert(out), grid)
            # black stays black, in the transformed positions
            np.testing.assert_array_equal(out == 0, dihedral(grid == 0, t))
            # colours map as the permutation says
            np.testing.assert_array_equal(out, dihedral(np.asarray(perm)[grid], t))


def test_augmentation_validation_and_identity():
    assert Augmentation.identity() == Augmentation(0, tuple(range(10)))
    assert Augmentation(1, tuple(range(10))) != Augmentation.identity()
    with pytest.raises(ValueError):
        Augmentation(0, (1, 0, 2, 3, 4, 5, 6, 7, 8, 9))  # moves black
    with pytest.raises(ValueError):
        Augmentation(0, (0, 1, 1, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError):
        Augmentation(9, tuple(range(10)))


def test_augmentation_for_is_pure_and_index_0_is_identity():
    assert augmentation_for(0, "abc", 0) == Augmentation.identity()
    assert augmentation_for(123, "xyz", 0) == Augmentation.identity()
    assert augmentation_for(0, "abc", 5) == augmentation_for(0, "abc", 5)
    augs = [augmentation_for(0, "abc", i) for i in range(1, 41)]
    assert len(set(augs)) == 40
    assert {a.dihedral for a in augs} == set(range(8))
    assert all(a.colour_perm[0] == 0 for a in augs)
    # the seed and the task id both matter
    assert augmentation_for(1, "abc", 5) != augmentation_for(0, "abc", 5)
    assert augmentation_for(0, "abd", 5) != augmentation_for(0, "abc", 5)


def test_translation_for():
    assert translation_for(0, "abc", 0, 3, 4, 10) == (0, 0)
    offsets = {translation_for(0, "abc", i, 3, 4, 10) for i in range(1, 400)}
    assert {r for r, _ in offsets} == set(range(8))  # 0..10-3
    assert {c for _, c in offsets} == set(range(7))  # 0..10-4
    assert translation_for(7, "abc", 3, 3, 4, 10) == translation_for(7, "abc", 3, 3, 4, 10)
    assert translation_for(0, "abc", 3, 10, 10, 10) == (0, 0)
    with pytest.raises(ValueError):
        translation_for(0, "abc", 3, 11, 4, 10)
