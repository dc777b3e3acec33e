"""Point groups as sets of rotation matrices.

Orientation conventions (those of RELION / Heymann et al. 2005):
Cn: n-fold axis along z. Dn: Cn plus a 2-fold axis along x. T: 2-fold axes on
x, y, z, 3-fold along (1, 1, 1). O: 4-fold axes on x, y, z. I (= I2): 2-fold axes
on x, y, z, with 5-fold axes in the yz-plane, along (0, 1, phi); I1 is I2 turned
by 90 degrees about z (5-fold axes in the xz-plane).
"""
from __future__ import annotations

import re

import numpy as np

_PHI = (1.0 + 5.0 ** 0.5) / 2.0


def axis_rotation(axis, angle_rad: float) -> np.ndarray:
    """Rotation by ``angle_rad`` about ``axis`` (right-handed), (3, 3)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def close_group(generators: list[np.ndarray], max_size: int = 120) -> np.ndarray:
    """All products of ``generators`` (the group they generate), identity first, (G, 3, 3)."""
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if not any(np.allclose(p, q, atol=1e-8) for q in group):
                    group.append(p)
                    new.append(p)
        if len(group) > max_size:
            raise ValueError("generators do not close into a finite point group")
        frontier = new
    return np.stack(group)


def symmetry_group(name: str) -> np.ndarray:
    """Rotation matrices (G, 3, 3) of point group ``name`` (C1, Cn, Dn, T, O, I, I1, I2), identity first."""
    label = name.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", label)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise ValueError(f"symmetry '{name}': the order must be at least 1")
        gens = [axis_rotation([0, 0, 1], 2 * np.pi / n)]
        if m.group(1) == "D":
            gens.append(axis_rotation([1, 0, 0], np.pi))
        return close_group(gens)
    if label == "T":
        return close_group([axis_rotation([0, 0, 1], np.pi), axis_rotation([1, 1, 1], 2 * np.pi / 3)])
    if label == "O":
        return close_group([axis_rotation([0, 0, 1], np.pi / 2), axis_rotation([1, 1, 1], 2 * np.pi / 3)])
    if label in ("I", "I2", "I1"):
        five = [0.0, 1.0, _PHI] if label != "I1" else [1.0, 0.0, _PHI]
        return close_group([axis_rotation([0, 0, 1], np.pi), axis_rotation(five, 2 * np.pi / 5),
                            axis_rotation([1, 0, 0], np.pi)])
    raise ValueError(f"unknown symmetry '{name}': use C1, Cn, Dn, T, O, I (I1/I2)")
