"""Fourier shell correlation and resolution estimates."""
from __future__ import annotations

import numpy as np
import torch

from .fourier import SLAB_ELEMENTS, half_plane_hermitian_weights, half_space_radius


def fsc(volume_a: np.ndarray | torch.Tensor, volume_b: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """FSC of two cubes (D, D, D), each times ``mask`` if given, in integer shells 0 .. D//2
    (index units).

    Sums run over the Hermitian half space of real transforms (x >= 0), each coefficient with the
    weight of the conjugate it stands for, z-slab by z-slab. The transforms are float64 whatever
    the input's type, made slab by slab (:func:`_half_transform`, which applies the mask per
    slab): two complex half-space grids are the only full-size arrays.
    """
    a, b = torch.as_tensor(np.asarray(volume_a)), torch.as_tensor(np.asarray(volume_b))
    box = a.shape[-1]
    if a.shape != b.shape or a.shape != (box,) * 3:
        raise ValueError(f"FSC needs two cubes of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    m = None if mask is None else torch.as_tensor(np.asarray(mask))
    if m is not None and m.shape != a.shape:
        raise ValueError(f"the FSC mask {tuple(m.shape)} differs from the maps {tuple(a.shape)}")
    fa, fb = _half_transform(a, m), _half_transform(b, m)
    n = box // 2 + 1
    weight = torch.as_tensor(half_plane_hermitian_weights(box)[0])
    sums = torch.zeros((3, n + 1), dtype=torch.float64)  # cross, power a, power b; shells beyond D//2 in bin n
    step = max(1, (1 << 18) // (box * weight.numel()))
    for z0 in range(0, box, step):
        shell = torch.round(half_space_radius(box, z=slice(z0, z0 + step))).long().clamp_(max=n).reshape(-1)
        ca, cb = fa[z0:z0 + step], fb[z0:z0 + step]
        for row, v in zip(sums, (ca.real * cb.real + ca.imag * cb.imag, ca.abs() ** 2, cb.abs() ** 2)):
            row.index_add_(0, shell, (v * weight).reshape(-1))
    cross, pa, pb = sums[:, :n].numpy()
    return cross / np.sqrt(np.maximum(pa * pb, 1e-300))


def _half_transform(volume: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.fft.rfftn`` of a real cube (times ``mask``) in float64, (D, D, D//2+1) complex128,
    without a float64 or masked copy of the input: 2D transforms of z-slabs, then the z
    transform in y-slabs, in place."""
    box = volume.shape[-1]
    out = torch.empty((box, box, box // 2 + 1), dtype=torch.complex128)
    step = max(1, SLAB_ELEMENTS // (box * box))
    for z0 in range(0, box, step):
        slab = volume[z0:z0 + step].to(torch.float64)
        if mask is not None:
            slab = slab * mask[z0:z0 + step]
        out[z0:z0 + step] = torch.fft.rfft2(slab)
    for y0 in range(0, box, step):
        out[:, y0:y0 + step] = torch.fft.fft(out[:, y0:y0 + step], dim=0)
    return out


def shell_to_resolution_A(shell: float, box: int, pixel_size_A: float) -> float:
    """Resolution in A of index frequency ``shell`` (inf at 0)."""
    return float("inf") if shell <= 0 else box * pixel_size_A / shell


def resolution_at(curve: np.ndarray, threshold: float, box: int, pixel_size_A: float) -> float:
    """Resolution (A) where ``curve`` first falls below ``threshold`` (linear interpolation between shells).

    Shell 0 is ignored. A curve that never falls below gives Nyquist (2 pixels).
    """
    c = np.asarray(curve, dtype=np.float64)
    for k in range(1, len(c)):
        if c[k] < threshold:
            lo, hi = c[k - 1], c[k]
            frac = 0.0 if k == 1 or lo == hi else (lo - threshold) / (lo - hi)
            shell = (k - 1) + frac if k > 1 else 1.0
            return shell_to_resolution_A(shell, box, pixel_size_A)
    return 2.0 * pixel_size_A


def fsc_to_snr(curve: np.ndarray, full_set: bool = True) -> np.ndarray:
    """Spectral SNR per shell from a half-set FSC; ``full_set`` doubles it for the map from all data."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 1e-6, 0.999)
    snr = c / (1.0 - c)
    return 2.0 * snr if full_set else snr
