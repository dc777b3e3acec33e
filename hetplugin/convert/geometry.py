"""Scipion projection alignments (ALIGN_PROJ 4x4 matrices) <-> RELION angles and shifts.

The convention, as scipion-em-relion and scipion-em-xmipp read and write it,
checked numerically against ``pwem.convert.transformations`` and RELION 3.1's
``relion_project`` (see ``hetplugin/tests/test_convert.py``):

* RELION's rotation for Euler angles (rot, tilt, psi) in degrees is
  ``A = euler_to_matrix(rot, tilt, psi)`` (ZYZ, RELION's ``Euler_angles2matrix``;
  ``hetplugin.core.rotations``). It equals pwem's
  ``euler_matrix(-rot, -tilt, -psi, axes='szyz')`` (radians).
* RELION's origin ``s = (rlnOriginXAngst, rlnOriginYAngst) / pixel_size`` is in
  pixels here. The Scipion ``Transform`` of a particle stores the INVERSE of
  ``[[A, -s], [0, 1]]``, i.e.::

      M = [[A.T, A.T @ s],
           [0,   1      ]]          (s = (sx, sy, 0), pixels)

  so ``M[:3, :3]`` is ``A`` transposed and ``M[:3, 3]`` is the origin rotated
  into the volume frame. Read back: ``A = M[:3, :3].T`` and ``s = A @ M[:3, 3]``.
* Meaning (verified with ``relion_project``): a point ``r`` of the reference
  volume (pixels from its centre) appears in the particle image at
  ``(A @ r)[:2] - s`` (pixels from the image centre; x = fastest array axis).
  Equivalently ``M @ (x, y, 0, 1)`` maps an image point back into the volume
  frame. A positive origin means the particle sits at ``-s`` from the centre.
* Scipion's Transform shifts are in PIXELS of the particle set; RELION 3.1 STAR
  origins are in ANGSTROM: multiply / divide by the sampling rate.

Angles come back in RELION's canonical range (tilt in [0, 180]); at tilt 0 or
180 rot is 0 and psi carries the in-plane angle (same rotation as any other
triple). pwem's ``euler_from_matrix`` returns the same triples away from those
poles. Everything here is numpy, vectorised over N particles.
"""
from __future__ import annotations

import numpy as np

from hetplugin.core.rotations import euler_to_matrix, matrix_to_euler

__all__ = ["alignment_to_relion", "relion_to_alignment",
           "alignments_to_relion", "relion_to_alignments"]

#: Largest accepted deviation of ``R @ R.T`` from the identity.
_ORTHO_TOL = 1e-4


def relion_to_alignments(rot_deg, tilt_deg, psi_deg, shift_x_px, shift_y_px) -> np.ndarray:
    """RELION angles (deg) and origins (PIXELS), arrays of N -> Scipion matrices (N, 4, 4).

    ``shift_*_px`` are RELION's ``rlnOriginX/YAngst`` divided by the pixel size.
    """
    arrays = [np.atleast_1d(np.asarray(v, dtype=np.float64))
              for v in (rot_deg, tilt_deg, psi_deg, shift_x_px, shift_y_px)]
    rot, tilt, psi, sx, sy = np.broadcast_arrays(*arrays)
    if rot.ndim != 1:
        raise ValueError("relion_to_alignments: expected scalars or 1-D arrays, got shape %s"
                         % (rot.shape,))
    if not all(np.all(np.isfinite(a)) for a in (rot, tilt, psi, sx, sy)):
        raise ValueError("relion_to_alignments: angles and shifts must be finite")
    a = euler_to_matrix(rot, tilt, psi)                       # (N, 3, 3)
    s = np.stack([sx, sy, np.zeros_like(sx)], axis=-1)        # (N, 3)
    m = np.zeros((rot.shape[0], 4, 4))
    at = np.swapaxes(a, -1, -2)
    m[:, :3, :3] = at
    m[:, :3, 3] = np.einsum("nij,nj->ni", at, s)
    m[:, 3, 3] = 1.0
    return m


def alignments_to_relion(matrices) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                             np.ndarray, np.ndarray]:
    """Scipion ALIGN_PROJ matrices (N, 4, 4) -> (rot, tilt, psi) in degrees and
    (shift_x, shift_y) in PIXELS (RELION origins), each an array of N.

    Raises ValueError for matrices whose 3x3 part is not a rotation (mirrors and
    scalings have no RELION equivalent). The z component of the origin (always 0
    for matrices built from RELION values) is dropped.
    """
    m = np.asarray(matrices, dtype=np.float64)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != (4, 4):
        raise ValueError("alignments_to_relion: expected (N, 4, 4) matrices, got shape %s"
                         % (m.shape,))
    if not np.all(np.isfinite(m)):
        raise ValueError("alignments_to_relion: matrices contain NaN or inf")
    r = m[:, :3, :3]
    dev = np.abs(np.einsum("nij,nkj->nik", r, r) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(r)
    bad = np.flatnonzero((dev > _ORTHO_TOL) | (det < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError("alignments_to_relion: %d matrix(es) are not rotations (first at "
                         "position %d: |R R^T - I| = %.3g, det = %.4f); mirrored or scaled "
                         "projection transforms are not supported" % (bad.size, i, dev[i], det[i]))
    a = np.swapaxes(r, -1, -2)
    s = np.einsum("nij,nj->ni", a, m[:, :3, 3])
    rot, tilt, psi = matrix_to_euler(a)
    return rot, tilt, psi, s[:, 0].copy(), s[:, 1].copy()


def relion_to_alignment(rot, tilt, psi, shift_x_px, shift_y_px) -> np.ndarray:
    """One particle: RELION angles (deg) and origin (PIXELS) -> Scipion 4x4 matrix."""
    return relion_to_alignments(rot, tilt, psi, shift_x_px, shift_y_px)[0]


def alignment_to_relion(transform_matrix_4x4) -> tuple[float, float, float, float, float]:
    """One particle: Scipion 4x4 ALIGN_PROJ matrix -> (rot, tilt, psi, shift_x_px, shift_y_px)."""
    m = np.asarray(transform_matrix_4x4, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError("alignment_to_relion: expected a 4x4 matrix, got shape %s" % (m.shape,))
    return tuple(float(v[0]) for v in alignments_to_relion(m[None]))
