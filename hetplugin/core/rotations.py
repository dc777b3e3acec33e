"""Rotations in RELION's convention.

One convention, used everywhere in the core: Euler angles (rot, tilt, psi) in
degrees, ZYZ, as in RELION's ``Euler_angles2matrix``:

    A = Rz(psi) @ Ry(tilt) @ Rz(rot),   Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]],
                                         Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]].

A projection with matrix A is the volume rotated by A (V'(r) = V(A^T r)) and
summed along z; in Fourier space the image at 2D frequency (kx, ky) samples the
volume's transform at A^T (kx, ky, 0). Vectors are (x, y, z) with x the fastest
(last) array axis.
"""
from __future__ import annotations

import numpy as np

_EPS = 16 * np.finfo(np.float32).eps


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """ZYZ Euler angles in degrees, shape (N,) or scalars -> rotation matrices (N, 3, 3) float64."""
    a, b, g = (np.deg2rad(np.atleast_1d(np.asarray(x, dtype=np.float64)))
               for x in (rot_deg, tilt_deg, psi_deg))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation matrices (N, 3, 3) -> (rot, tilt, psi) in degrees, tilt in [0, 180].

    Inverse of :func:`euler_to_matrix`; at tilt 0 or 180 (gimbal lock) rot is set
    to 0 and psi carries the in-plane angle, as RELION does.
    """
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    abs_sb = np.hypot(m[:, 0, 2], m[:, 1, 2])
    regular = abs_sb > _EPS
    psi = np.where(regular, np.arctan2(m[:, 1, 2], -m[:, 0, 2]), 0.0)
    rot = np.where(regular, np.arctan2(m[:, 2, 1], m[:, 2, 0]), 0.0)
    tilt = np.where(regular, np.arctan2(abs_sb, m[:, 2, 2]), 0.0)
    up = ~regular & (m[:, 2, 2] > 0)
    down = ~regular & (m[:, 2, 2] <= 0)
    psi = np.where(up, np.arctan2(-m[:, 1, 0], m[:, 0, 0]), psi)
    psi = np.where(down, np.arctan2(m[:, 1, 0], -m[:, 0, 0]), psi)
    tilt = np.where(down, np.pi, tilt)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternions (N, 4) as (w, x, y, z) -> rotation matrices (N, 3, 3)."""
    q = np.asarray(q, dtype=np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations drawn uniformly from SO(3) (normalised Gaussian quaternions), (n, 3, 3)."""
    return quaternion_to_matrix(rng.standard_normal((n, 4)))


def angular_distance_deg(a, b) -> np.ndarray:
    """Geodesic angle in degrees between rotation matrices a and b (broadcast over leading axes)."""
    trace = np.einsum("...ij,...ij->...", np.asarray(a), np.asarray(b))
    return np.rad2deg(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
