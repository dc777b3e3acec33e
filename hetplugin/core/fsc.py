"""Fourier shell correlation and resolution estimates."""
from __future__ import annotations

import numpy as np
import torch

from .fourier import fftn_centered, radial_index


def fsc(volume_a: np.ndarray | torch.Tensor, volume_b: np.ndarray | torch.Tensor) -> np.ndarray:
    """FSC of two cubes (D, D, D) in integer shells 0 .. D//2 (index units)."""
    a = torch.as_tensor(np.asarray(volume_a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(volume_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"FSC needs two volumes of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    box = a.shape[-1]
    fa = fftn_centered(a, (-3, -2, -1)).numpy().ravel()
    fb = fftn_centered(b, (-3, -2, -1)).numpy().ravel()
    shells = radial_index(a.shape).ravel()
    n = box // 2 + 1
    keep = shells < n
    s = shells[keep]
    cross = np.bincount(s, weights=(fa * fb.conj()).real[keep], minlength=n)
    pa = np.bincount(s, weights=(np.abs(fa) ** 2)[keep], minlength=n)
    pb = np.bincount(s, weights=(np.abs(fb) ** 2)[keep], minlength=n)
    return cross / np.sqrt(np.maximum(pa * pb, 1e-300))


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
