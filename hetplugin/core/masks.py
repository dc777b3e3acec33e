"""Soft masks and mask checks."""
from __future__ import annotations

import numpy as np
import torch

from .fourier import radius


def spherical_mask(box: int, radius_px: float, edge_px: float = 3.0, ndim: int = 3) -> np.ndarray:
    """Soft sphere (or disc for ndim=2): 1 inside ``radius_px``, a raised cosine of ``edge_px`` outside, float32."""
    r = radius((box,) * ndim)
    t = np.clip((r - radius_px) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def check_mask(mask: np.ndarray, name: str = "mask") -> None:
    """Raise ValueError when a mask has values outside [0, 1], is empty, or is everything."""
    lo, hi = float(np.min(mask)), float(np.max(mask))
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{name}: values must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]; "
                         "make a soft binary mask (e.g. relion_mask_create or Xmipp's create mask)")
    if hi <= 0.0:
        raise ValueError(f"{name} is empty (all zero): it selects no region")
    if lo >= 1.0:
        raise ValueError(f"{name} is one everywhere: it selects the whole box, so it masks nothing")


def soft_threshold_mask(volume: np.ndarray, threshold: float, extend_px: float = 2.0, edge_px: float = 4.0) -> np.ndarray:
    """Binary mask of ``volume > threshold``, dilated by ``extend_px`` and given a raised-cosine edge of ``edge_px``."""
    binary = torch.as_tensor(np.asarray(volume) > threshold, dtype=torch.float32)[None, None]
    reach = int(np.ceil(extend_px + edge_px))
    if reach == 0:
        return binary[0, 0].numpy()
    # distance to the binary region, approximated by repeated max-pooling (1 voxel per step)
    dist = torch.where(binary > 0, 0.0, float(reach + 1))
    grown = binary
    for step in range(1, reach + 1):
        grown = torch.nn.functional.max_pool3d(grown, 3, stride=1, padding=1)
        dist = torch.where((grown > 0) & (dist > step), torch.tensor(float(step)), dist)
    d = dist[0, 0].numpy()
    t = np.clip((d - extend_px) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)
