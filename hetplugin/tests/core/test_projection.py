"""Projection/backprojection: adjointness, hot spots, CTF zeros, reconstruction accuracy."""
import math

import numpy as np
import pytest
import torch

from hetplugin.core.ctf import CTFParams, ctf_values, electron_wavelength_A
from hetplugin.core.fourier import fftn_centered, half_plane_coords, rfft2_centered, shift_phase
from hetplugin.core.fsc import fsc
from hetplugin.core.masks import spherical_mask
from hetplugin.core.projection import frequency_mask, gridding_correction, prepare_volume, project_ft, project_images
from hetplugin.core.reconstruct import Backprojector
from hetplugin.core.rotations import euler_to_matrix, random_rotations
from hetplugin.core.simulate import make_class_volumes
from hetplugin.tests.core.maps import backproject_ft, crop_volume


def test_projector_adjointness_float64():
    gen = torch.Generator().manual_seed(0)
    size = 24
    v = torch.randn(size, size, size, dtype=torch.complex128, generator=gen)
    rot = torch.as_tensor(random_rotations(7, np.random.default_rng(1)))
    # frequencies inside the valid disc |k| <= D/2 - 1 (D = size / 2)
    k = torch.as_tensor(np.random.default_rng(2).uniform(-3.5, 3.5, (40, 2)))
    u = torch.randn(7, 40, dtype=torch.complex128, generator=gen)
    lhs = (project_ft(v, rot, k) * u.conj()).sum()
    rhs = (v * backproject_ft(u, rot, k, size).conj()).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-6
    # real weights go through the same transpose
    w = torch.rand(7, 40, dtype=torch.float64, generator=gen)
    g = torch.rand(size, size, size, dtype=torch.float64, generator=gen)
    lhs_r = (project_ft(g.to(torch.complex128), rot, k).real * w).sum()
    rhs_r = (g * backproject_ft(w, rot, k, size)).sum()
    assert abs(lhs_r - rhs_r) / abs(lhs_r) < 1e-6


def test_half_space_backprojector_equals_the_full_adjoint_made_hermitian():
    """The backprojector keeps only x >= 0 (a sample at x < 0 goes in conjugated at -q): its
    grids must equal the full-grid adjoint completed as G(q) + conj(G(-q)), everywhere, also
    on the plane x = 0 and back through the full-grid expansion that symmetry uses."""
    from hetplugin.core.reconstruct import _full_grid, _half_grid
    box, n = 16, 9
    bp = Backprojector(box, 2, dtype=torch.float64)
    rng = np.random.default_rng(4)
    rot = torch.as_tensor(random_rotations(n, rng))
    m = bp.coords.shape[0]
    x = torch.as_tensor(rng.normal(size=(n, m)) + 1j * rng.normal(size=(n, m)))
    ctf = torch.as_tensor(rng.uniform(-1, 1, (n, m)))
    bp.insert(x, rot, ctf)
    half = torch.where(bp.coords[:, 0] == 0, 0.5, 1.0).to(torch.float64)
    full_d = backproject_ft(x * ctf * half, rot, bp.coords, bp.size)
    full_w = backproject_ft(ctf * ctf * half, rot, bp.coords, bp.size)
    mirror = lambda g: torch.roll(torch.flip(g, (0, 1, 2)), (1, 1, 1), (0, 1, 2))  # index i -> (P - i) mod P
    want_d, want_w = full_d + mirror(full_d).conj(), full_w + mirror(full_w)
    data, weight = bp.grids()
    assert (weight > 0).sum() > 1000 and (bp.weight[..., 0] > 0).any()
    assert torch.allclose(data, _half_grid(want_d), atol=1e-12)
    assert torch.allclose(weight, _half_grid(want_w), atol=1e-12)
    assert torch.allclose(_full_grid(data), want_d, atol=1e-12)


def _blob_volume(box, centre, sigma=1.5):
    ax = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    return torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma ** 2))


def test_hot_spot_lands_where_the_rotation_puts_it():
    box = 32
    centre = np.array([7.0, -4.0, 3.0])
    vol = _blob_volume(box, centre)
    for angles in [(0, 0, 0), (90, 0, 0), (30, 40, 50), (-120, 100, 10)]:
        a = euler_to_matrix(*angles)
        origin = np.array([[1.5, -2.0]])
        img = project_images(vol, torch.as_tensor(a), torch.as_tensor(origin))[0].numpy()
        expected = (a[0] @ centre)[:2] - origin[0]  # rotated by A, moved by -origin (RELION)
        iy, ix = np.unravel_index(np.argmax(img), img.shape)
        # centre of mass around the peak, sub-pixel
        win = img[iy - 3:iy + 4, ix - 3:ix + 4]
        gy, gx = np.mgrid[-3:4, -3:4]
        pos = np.array([ix + (win * gx).sum() / win.sum(), iy + (win * gy).sum() / win.sum()]) - box // 2
        assert np.linalg.norm(pos - expected) < 0.2, (angles, pos, expected)


def test_projection_of_zero_rotation_is_the_sum_along_z():
    box = 32
    vol = torch.as_tensor(make_class_volumes(box, 1, seed=2)[0], dtype=torch.float64)
    img = project_images(vol, torch.eye(3, dtype=torch.float64)[None])[0]
    direct = vol.sum(0)
    assert np.corrcoef(img.numpy().ravel(), direct.numpy().ravel())[0, 1] > 0.999


def test_ctf_zeros_and_sign():
    box, px = 128, 1.0
    k = torch.arange(1, box // 2, dtype=torch.float64)
    zeros = torch.zeros_like(k)
    one = lambda v: np.array([float(v)])
    p = CTFParams(one(20000), one(20000), one(0), one(300), one(0), one(0.0), one(0), one(0), one(1))
    c = ctf_values(p, k, zeros, box, px)[0].numpy()
    lam = electron_wavelength_A(300)
    assert abs(lam - 0.019687) < 1e-5
    # with Cs = 0 and Q = 0 the zeros are at s^2 = n / (lambda dz)
    s_zero = math.sqrt(1.0 / (lam * 20000))
    k_zero = s_zero * box * px
    first = np.flatnonzero(np.diff(np.sign(c)) != 0)[0]
    assert k[first] <= k_zero <= k[first + 1]
    # amplitude contrast: positive at zero frequency, equal to Q
    p2 = CTFParams(one(20000), one(20000), one(0), one(300), one(2.7), one(0.1), one(0), one(0), one(1))
    c0 = ctf_values(p2, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), box, px)
    assert abs(float(c0) - 0.1) < 1e-9


def test_ctf_astigmatism_direction():
    box, px = 128, 1.0
    one = lambda v: np.array([float(v)])
    p = CTFParams(one(25000), one(15000), one(30), one(300), one(2.7), one(0.1), one(0), one(0), one(1))
    r = 20.0
    along = torch.tensor([r * math.cos(math.radians(30))]), torch.tensor([r * math.sin(math.radians(30))])
    across = torch.tensor([r * math.cos(math.radians(120))]), torch.tensor([r * math.sin(math.radians(120))])
    pu = CTFParams(one(25000), one(25000), one(0), one(300), one(2.7), one(0.1), one(0), one(0), one(1))
    pv = CTFParams(one(15000), one(15000), one(0), one(300), one(2.7), one(0.1), one(0), one(0), one(1))
    assert torch.allclose(ctf_values(p, *[t.double() for t in along], box, px),
                          ctf_values(pu, *[t.double() for t in along], box, px))
    assert torch.allclose(ctf_values(p, *[t.double() for t in across], box, px),
                          ctf_values(pv, *[t.double() for t in across], box, px))


def test_noise_free_reconstruction_matches_truth():
    box = 32
    vol = make_class_volumes(box, 1, seed=0)[0]
    rng = np.random.default_rng(0)
    n = 1500
    rot = torch.as_tensor(random_rotations(n, rng), dtype=torch.float32)
    origins = torch.as_tensor(rng.uniform(-2, 2, (n, 2)), dtype=torch.float32)
    imgs = project_images(torch.as_tensor(vol), rot, origins)
    bp = Backprojector(box)
    ft = rfft2_centered(imgs)[:, bp.select]
    ft = ft * shift_phase(bp.coords[:, 0], bp.coords[:, 1], origins[:, 0], origins[:, 1], box)
    bp.insert(ft, rot)
    rec = bp.reconstruct().numpy()
    m = spherical_mask(box, 0.4 * box) > 0.5
    assert np.corrcoef(rec[m], vol[m])[0, 1] > 0.99
    assert abs((rec[m] * vol[m]).sum() / (vol[m] ** 2).sum() - 1) < 0.05


def test_prepare_volume_equals_the_cropped_transform_of_the_padded_volume():
    """The axis-by-axis transform (padding and cropping per axis) is the whole padded 3D
    transform's centre, for even and odd boxes, pads 2 and 3, full and cropped sizes."""
    gen = torch.Generator().manual_seed(3)
    for box, pad in ((24, 2), (25, 2), (16, 3)):
        vol = torch.randn(box, box, box, dtype=torch.float64, generator=gen)
        padded = pad * box
        start = padded // 2 - box // 2
        full = torch.zeros((padded,) * 3, dtype=torch.float64)
        full[start:start + box, start:start + box, start:start + box] = vol / gridding_correction(
            box, pad, dtype=torch.float64)
        truth = fftn_centered(full, (-3, -2, -1))
        for size in (padded, padded - 7, 2 * (box // 4) + 2, 9):
            got = prepare_volume(vol, pad, size)
            assert got.shape == (size,) * 3
            assert torch.allclose(got, crop_volume(truth, size), atol=1e-10 * truth.abs().max()), (box, pad, size)


def test_half_space_references_project_as_the_full_grid():
    """Slices of the half space x >= 0 (read at -q, conjugated, where x < 0) equal those of the
    full grid, for even and odd boxes and cropped sizes; the half space is the full grid's."""
    gen = torch.Generator().manual_seed(4)
    rot = torch.as_tensor(random_rotations(40, np.random.default_rng(4)), dtype=torch.float64)
    for box, pad, size in ((24, 2, 48), (25, 2, 30), (16, 3, 26)):
        vol = torch.randn(box, box, box, dtype=torch.float64, generator=gen)
        full = prepare_volume(vol, pad, size)
        half = prepare_volume(vol, pad, size, half=True)
        assert half.shape == (size, size, size // 2)
        assert torch.allclose(half, full[..., size // 2:], atol=1e-12 * full.abs().max())
        k = torch.as_tensor(half_plane_coords(box)[frequency_mask(box, size / (2 * pad) - 1.01)], dtype=torch.float64)
        want = project_ft(full, rot, k, pad)
        got = project_ft(half, rot, k, pad)
        assert torch.allclose(got, want, atol=1e-12 * want.abs().max()), (box, pad, size)
    with pytest.raises(ValueError, match="even size"):
        prepare_volume(vol, pad, 25, half=True)


def test_map_from_a_cropped_half_grid_equals_the_padded_inverse_transform():
    """The axis-by-axis inverse equals zero-padding the cropped half grid to (N, N, N/2+1) and
    irfftn, with the centred z and y undone by the (-1)^(z+y) sign of the shifted origin."""
    from hetplugin.core.reconstruct import _half_grid_to_map
    gen = torch.Generator().manual_seed(5)
    box, pad = 20, 2
    n = pad * box
    for size in (n, 30, 28, 14):
        data = torch.randn((size, size, size // 2 + 1), dtype=torch.complex128, generator=gen)
        padded = torch.zeros((n, n, n // 2 + 1), dtype=torch.complex128)
        s = n // 2 - size // 2
        padded[s:s + size, s:s + size, :size // 2 + 1] = data
        raw = torch.fft.irfftn(padded, s=(n, n, n))
        centred = torch.arange(box) - box // 2
        at = centred % n
        sign = (1.0 - 2.0 * (centred % 2)).to(torch.float64)
        truth = raw[at][:, at][:, :, at] * sign[:, None, None] * sign[None, :, None]
        truth = truth / gridding_correction(box, pad, dtype=torch.float64)
        got = _half_grid_to_map(data, box, pad)
        assert torch.allclose(got, truth, atol=1e-12 * truth.abs().max()), size


def test_prepare_volume_round_trip():
    from hetplugin.core.reconstruct import _half_grid_to_map
    vol = torch.as_tensor(make_class_volumes(24, 1, seed=1)[0], dtype=torch.float64)
    full = prepare_volume(vol)
    # the half space x >= 0 of the centred (48, 48, 48) grid: kx = 0..23, then kx = 24 (= -24)
    half = torch.cat([full[..., 24:], full[..., :1]], -1)
    # prepare divides by the gridding factor, the map from the grid divides again (it undoes the
    # interpolation blur of a reconstruction): the round trip differs by that factor squared
    back = _half_grid_to_map(half, 24, 2) * gridding_correction(24, 2, dtype=torch.float64) ** 2
    assert torch.allclose(back, vol, atol=1e-9)
    assert frequency_mask(24).sum() == (np.hypot(*half_plane_coords(24).reshape(-1, 2).T) <= 11).sum()


def test_fsc_equals_the_full_transform_formula():
    """The half-space, slab-by-slab FSC against sums over the full complex transform (float64,
    shells by rounded radius), for even and odd boxes and float32 input; a mask given to fsc
    equals masked inputs."""
    rng = np.random.default_rng(5)
    for box in (16, 17, 32):
        a = rng.standard_normal((box,) * 3).astype(np.float32)
        b = (a + 2.0 * rng.standard_normal((box,) * 3)).astype(np.float32)
        fa = np.fft.fftshift(np.fft.fftn(a.astype(np.float64)))
        fb = np.fft.fftshift(np.fft.fftn(b.astype(np.float64)))
        g = np.arange(box) - box // 2
        shell = np.rint(np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)).astype(int)
        n = box // 2 + 1
        inside = shell < n
        cross = np.bincount(shell[inside], (fa * fb.conj()).real[inside], n)
        power = [np.bincount(shell[inside], np.abs(f[inside]) ** 2, n) for f in (fa, fb)]
        expected = cross / np.sqrt(power[0] * power[1])
        assert np.abs(fsc(a, b) - expected).max() < 1e-12
        assert np.abs(fsc(torch.as_tensor(a), b) - expected).max() < 1e-12
        mask = spherical_mask(box, box / 3, edge_px=2)
        masked = fsc(a.astype(np.float64) * mask, b.astype(np.float64) * mask)
        assert np.abs(fsc(a, b, mask) - masked).max() < 1e-12
        assert np.abs(masked - expected).max() > 1e-3     # the mask changes the curve
