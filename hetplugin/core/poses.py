"""Pose grids: uniform SO(3) samplings, local neighbourhoods and in-plane shift grids.

A global grid at step ``step_deg`` combines near-uniform projection directions
(a Fibonacci sphere, one direction per step_deg^2 of solid angle) with in-plane
angles psi every step_deg, like RELION's HEALPix x psi sampling. Directions are
restricted to the asymmetric unit implicitly by de-duplicating under the
symmetry group when one is given.
"""
from __future__ import annotations

import math

import numpy as np

from .rotations import euler_to_matrix, matrix_to_euler


def sphere_directions(step_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(rot_deg, tilt_deg) of near-uniform directions spaced about ``step_deg`` apart."""
    if step_deg <= 0:
        raise ValueError("angular step must be positive")
    step = math.radians(step_deg)
    n = max(2, int(round(4 * math.pi / (step * step))))
    i = np.arange(n) + 0.5
    tilt = np.arccos(1 - 2 * i / n)
    rot = (np.pi * (1 + 5 ** 0.5) * i) % (2 * np.pi)
    return np.rad2deg(rot), np.rad2deg(tilt)


def global_grid(step_deg: float, symmetry: np.ndarray | None = None) -> np.ndarray:
    """Rotation matrices (R, 3, 3) covering SO(3) (or SO(3)/G) at about ``step_deg``."""
    rot, tilt = sphere_directions(step_deg)
    if symmetry is not None and len(symmetry) > 1:
        rot, tilt = _asymmetric_directions(rot, tilt, symmetry)
    n_psi = max(1, int(round(360.0 / step_deg)))
    psi = np.arange(n_psi) * (360.0 / n_psi)
    r = np.repeat(rot, n_psi)
    t = np.repeat(tilt, n_psi)
    p = np.tile(psi, len(rot))
    return euler_to_matrix(r, t, p)


def _asymmetric_directions(rot: np.ndarray, tilt: np.ndarray, symmetry: np.ndarray):
    """Keep one direction per symmetry orbit: those whose direction is closest to a fixed reference."""
    dirs = euler_to_matrix(rot, tilt, np.zeros_like(rot))[:, 2, :]  # viewing direction = A^T z
    ref = np.array([0.12, 0.23, 0.96])
    ref /= np.linalg.norm(ref)
    # direction d maps to L^T d under the projection equivalence A -> A L^T; keep d when it is the
    # orbit member closest to ref
    scores = np.einsum("gij,nj,i->ng", symmetry, dirs, ref)  # (L d) . ref
    keep = scores.argmax(1) == 0
    return rot[keep], tilt[keep]


def local_grid(step_deg: float, range_deg: float) -> np.ndarray:
    """Small rotations dR (R, 3, 3) within ``range_deg`` of the identity on a ~``step_deg`` lattice (identity first)."""
    if range_deg <= 0:
        return np.eye(3)[None]
    n = int(math.floor(range_deg / step_deg))
    ax = np.arange(-n, n + 1) * math.radians(step_deg)
    vx, vy, vz = np.meshgrid(ax, ax, ax, indexing="ij")
    vec = np.stack([vx.ravel(), vy.ravel(), vz.ravel()], 1)
    ang = np.linalg.norm(vec, axis=1)
    vec = vec[ang <= math.radians(range_deg) + 1e-9]
    vec = vec[np.argsort(np.linalg.norm(vec, axis=1), kind="stable")]
    return rotvec_to_matrix(vec)


def rotvec_to_matrix(vec: np.ndarray) -> np.ndarray:
    """Rotation vectors (N, 3) (axis * angle in radians) -> matrices (N, 3, 3) (Rodrigues)."""
    vec = np.asarray(vec, dtype=np.float64).reshape(-1, 3)
    ang = np.linalg.norm(vec, axis=1)
    axis = np.where(ang[:, None] > 0, vec / np.maximum(ang, 1e-300)[:, None], np.array([0.0, 0.0, 1.0]))
    k = np.zeros((len(vec), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k[:, 1, 0], k[:, 2, 0], k[:, 2, 1] = axis[:, 2], -axis[:, 1], axis[:, 0]
    s, c = np.sin(ang)[:, None, None], np.cos(ang)[:, None, None]
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def shift_grid(range_px: float, step_px: float) -> np.ndarray:
    """In-plane shifts (S, 2) in pixels on a square lattice of ``step_px`` within a disc of ``range_px`` (zero first)."""
    if range_px <= 0 or step_px <= 0:
        return np.zeros((1, 2))
    n = int(math.floor(range_px / step_px))
    ax = np.arange(-n, n + 1) * step_px
    gx, gy = np.meshgrid(ax, ax)
    s = np.stack([gx.ravel(), gy.ravel()], 1)
    s = s[np.hypot(s[:, 0], s[:, 1]) <= range_px + 1e-9]
    return s[np.argsort(np.hypot(s[:, 0], s[:, 1]), kind="stable")]


def grid_step_deg(rotations: np.ndarray) -> float:
    """Typical nearest-neighbour angular distance of a rotation set (a check of the sampling)."""
    from .rotations import angular_distance_deg
    r = np.asarray(rotations)
    rng = np.random.default_rng(0)
    probe = r[rng.choice(len(r), size=min(64, len(r)), replace=False)]
    d = angular_distance_deg(probe[:, None], r[None])
    d[d < 1e-6] = np.inf
    return float(np.median(d.min(1)))


__all__ = ["sphere_directions", "global_grid", "local_grid", "rotvec_to_matrix", "shift_grid",
           "grid_step_deg", "matrix_to_euler"]
