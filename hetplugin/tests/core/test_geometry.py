"""Rotations, symmetry groups, pose grids: conventions and closure."""
import numpy as np
import pytest

from hetplugin.core.poses import global_grid, grid_step_deg, local_grid, shift_grid
from hetplugin.core.rotations import angular_distance_deg, euler_to_matrix, matrix_to_euler, random_rotations
from hetplugin.core.symmetry import symmetry_group


def test_euler_matrix_matches_relion_formula_by_hand():
    # Rz(psi) Ry(tilt) Rz(rot) with RELION's passive Rz: rows of A for rot=90, tilt=0, psi=0
    a = euler_to_matrix(90, 0, 0)[0]
    np.testing.assert_allclose(a, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    b = euler_to_matrix(0, 90, 0)[0]
    np.testing.assert_allclose(b, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)


def test_euler_round_trip_random_and_gimbal():
    rng = np.random.default_rng(3)
    r = random_rotations(2000, rng)
    back = euler_to_matrix(*matrix_to_euler(r))
    assert np.abs(back - r).max() < 1e-10
    for tilt in (0.0, 180.0, 1e-7):
        m = euler_to_matrix(40.0, tilt, 25.0)
        rot, t, psi = matrix_to_euler(m)
        assert np.abs(euler_to_matrix(rot, t, psi) - m).max() < 1e-6
        assert 0.0 <= t[0] <= 180.0


def test_random_rotations_are_rotations_and_uniform():
    r = random_rotations(20000, np.random.default_rng(0))
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", r, r), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    assert np.allclose(np.linalg.det(r), 1.0)
    # uniform SO(3): the viewing direction's z component is uniform on [-1, 1]
    z = r[:, 2, 2]
    hist = np.histogram(z, bins=10, range=(-1, 1))[0] / len(z)
    assert np.abs(hist - 0.1).max() < 0.01


@pytest.mark.parametrize("name,size", [("C1", 1), ("C2", 2), ("C7", 7), ("D2", 4), ("D5", 10), ("T", 12),
                                       ("O", 24), ("I", 60), ("I1", 60), ("I2", 60)])
def test_symmetry_group_size_and_closure(name, size):
    g = symmetry_group(name)
    assert len(g) == size
    assert np.allclose(g[0], np.eye(3))
    for a in g:
        assert np.allclose(a @ a.T, np.eye(3), atol=1e-9)
        assert np.isclose(np.linalg.det(a), 1.0)
    products = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    d = np.abs(products[:, None] - g[None]).max(axis=(2, 3))
    assert np.all(d.min(axis=1) < 1e-8), "the group is not closed under products"


def test_symmetry_axes_conventions():
    c4 = symmetry_group("C4")
    assert np.allclose(c4 @ np.array([0, 0, 1.0]), [0, 0, 1])  # n-fold axis on z
    d2 = symmetry_group("D2")
    assert any(np.allclose(g, np.diag([1, -1, -1])) for g in d2)  # 2-fold on x
    with pytest.raises(ValueError, match="unknown symmetry"):
        symmetry_group("X3")


@pytest.mark.parametrize("step", [30.0, 15.0, 10.0])
def test_global_grid_spacing_and_coverage(step):
    g = global_grid(step)
    assert abs(grid_step_deg(g) - step) < 0.25 * step
    # every random rotation has a grid point within about the step
    probe = random_rotations(200, np.random.default_rng(1))
    worst = angular_distance_deg(probe[:, None], g[None]).min(1).max()
    assert worst < 1.3 * step


def test_global_grid_with_symmetry_is_smaller_by_the_group_order():
    full = len(global_grid(10.0))
    c4 = len(global_grid(10.0, symmetry_group("C4")))
    assert abs(c4 * 4 / full - 1) < 0.05


def test_local_grid_and_shift_grid():
    loc = local_grid(2.0, 6.0)
    assert np.allclose(loc[0], np.eye(3))
    assert angular_distance_deg(loc, np.eye(3)).max() <= 6.0 + 1e-9
    assert len(loc) > 50
    s = shift_grid(3.0, 1.0)
    assert np.allclose(s[0], 0) and np.hypot(*s.T).max() <= 3.0 and len(s) == 29
