"""Fitting maps to maps: a class map turned into the reference's frame, and classes matched
between half-sets (:func:`match_classes`).

A map refined from a featureless low-pass start is free to come out turned as a whole (its
particles' poses turned with it). ``fit_rotation`` finds the turn G with
``rotate_volume(moving, G) ~ fixed``; the moving map's particles then take poses ``R @ G.T``
(see :func:`rotate_volume` for the convention).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

from .fourier import lowpass_volume
from .poses import local_grid


def rotate_volume(volume: torch.Tensor, rotations: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Turned copies (N, D, D, D) of a (D, D, D) map about the box centre (index D//2):
    out[n](x) = volume(rotations[n]^T x), x = (x, y, z), trilinear, zero outside.

    With the projection convention of :func:`hetplugin.core.projection.project_ft` (a pose R
    samples the map's transform at R^T k), the image of ``volume`` at pose R is the image of
    the turned map at pose R @ rotations[n].T."""
    d = volume.shape[-1]
    ax = torch.arange(d, dtype=volume.dtype, device=volume.device) - d // 2
    rot = torch.as_tensor(rotations, dtype=volume.dtype, device=volume.device).reshape(-1, 3, 3)
    out = torch.empty((len(rot), d, d, d), dtype=volume.dtype, device=volume.device)
    # z-slabs of ~2^18 voxels: the sampling grid of a whole 256-px map would take 200 MB a turn
    slab = max(1, (1 << 18) // (d * d))
    for z0 in range(0, d, slab):
        z, y, x = torch.meshgrid(ax[z0:z0 + slab], ax, ax, indexing="ij")
        points = torch.stack([x, y, z], -1).reshape(-1, 3)
        for start in range(0, len(rot), chunk):
            r = rot[start:start + chunk]
            grid = points[None].expand(len(r), -1, -1).bmm(r)     # rows x^T R = (R^T x)^T
            grid.add_(d // 2).mul_(2.0 / (d - 1)).sub_(1.0)
            grid = grid.reshape(len(r), z.shape[0], d, d, 3)
            out[start:start + chunk, z0:z0 + slab] = F.grid_sample(
                volume[None, None].expand(len(r), 1, d, d, d), grid, mode="bilinear", padding_mode="zeros",
                align_corners=True)[:, 0]
    return out


def _downsample(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Fourier crop of a (D, D, D) map to (size, size, size) (even), centre D//2 -> size//2, through
    its real (half-space) transform."""
    d = volume.shape[-1]
    if size >= d:
        return volume
    ft = torch.fft.rfftn(torch.fft.ifftshift(volume, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    keep = (torch.fft.fftfreq(size, 1.0 / size, device=volume.device).round().long()) % d  # transform order
    ft = ft.index_select(0, keep).index_select(1, keep)[..., :size // 2 + 1]
    small = torch.fft.irfftn(ft, s=(size,) * 3, dim=(-3, -2, -1))
    return torch.fft.fftshift(small, dim=(-3, -2, -1)).to(volume.dtype) * (size / d) ** 3


def _scores(moving: torch.Tensor, fixed: torch.Tensor, rotations: np.ndarray) -> torch.Tensor:
    """Correlation coefficient of each turned ``moving`` with ``fixed`` (a chunk of turned maps at a
    time, their sampling grids within ~24 MB)."""
    chunk = int(min(8, max(1, 24e6 // (moving.numel() * 12))))
    f = (fixed - fixed.mean()).flatten()
    f = f / f.norm().clamp(min=1e-30)
    rot = torch.as_tensor(rotations)
    # one output written in place: small tensors kept between the large temporaries would pin
    # freed heap (measured: +130 MB of peak over 500 chunks)
    out = torch.empty(len(rot), dtype=moving.dtype)
    for start in range(0, len(rot), chunk):
        turned = rotate_volume(moving, rot[start:start + chunk], chunk).flatten(1)
        turned -= turned.mean(1, keepdim=True)
        out[start:start + chunk] = (turned @ f) / turned.norm(dim=1).clamp(min=1e-30)
    return out


def fit_rotation(moving: np.ndarray, fixed: np.ndarray, pixel_size_A: float, resolution_A: float,
                 range_deg: float = 30.0, mask: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The turn G (3, 3), within ``range_deg`` of the identity, that best superposes
    ``rotate_volume(moving, G)`` on ``fixed`` (both masked by ``mask``), and its correlation.

    Coarse (3 deg) at twice ``resolution_A``, then 1 and 0.5 deg steps at ``resolution_A``;
    both maps are low-passed and Fourier-cropped to the sampling each stage needs."""
    d = moving.shape[-1]
    m = torch.ones((d,) * 3, dtype=torch.float32) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    best = np.eye(3)
    score = float("nan")
    for res, step, rng in ((2 * resolution_A, 3.0, range_deg), (resolution_A, 1.0, 4.0),
                           (resolution_A, 0.5, 1.0)):
        res = max(res, 2 * pixel_size_A)
        size = min(d, 2 * math.ceil(d * pixel_size_A / res) + 2)
        a, b = (_downsample(lowpass_volume(torch.as_tensor(v, dtype=torch.float32) * m, res, pixel_size_A), size)
                for v in (moving, fixed))
        cand = best @ local_grid(step, rng)
        s = _scores(a, b, cand)
        i = int(torch.argmax(s))
        best, score = cand[i], float(s[i])
    return best, score


def match_classes(first: list[np.ndarray], second: list[np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
    """Permutation p such that first[p[j]] is the class of ``first`` that matches second[j].

    Classes are matched by the correlation of their deviations from their set's mean map, within
    ``mask`` if given (exhaustively for up to 7 classes, greedily beyond). The deviations' inner
    products are summed in float64 over blocks of voxels: no full-size copies are made.
    """
    k = len(first)
    flat = [np.asarray(m).reshape(-1) for m in list(first) + list(second)]
    weight = None if mask is None else np.asarray(mask).reshape(-1)
    gram = np.zeros((2 * k, 2 * k))
    step = 1 << 16
    for start in range(0, flat[0].size, step):
        block = np.stack([f[start:start + step] for f in flat]).astype(np.float64)
        block[:k] -= block[:k].mean(0)
        block[k:] -= block[k:].mean(0)
        if weight is not None:
            block *= weight[start:start + step]
        gram += block @ block.T
    norms = np.sqrt(np.diag(gram)) + 1e-30
    score = gram[:k, k:] / norms[:k, None] / norms[None, k:]  # score[a, b]: first a vs second b
    if k <= 7:
        best = max(itertools.permutations(range(k)), key=lambda p: sum(score[p[j], j] for j in range(k)))
        return np.array(best)
    perm = np.full(k, -1)
    free_a, free_b = set(range(k)), set(range(k))
    for a, b in sorted(np.ndindex(k, k), key=lambda ab: -score[ab]):
        if a in free_a and b in free_b:
            perm[b] = a
            free_a.discard(a)
            free_b.discard(b)
    return perm
