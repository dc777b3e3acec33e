"""Fourier central-slice projection.

A volume (D, D, D) is gridding-corrected, zero-padded by ``pad`` (2 by default)
and transformed: the result is a centred complex grid (P, P, P), P = pad * D.
A projection with rotation A samples that grid at pad * A^T (kx, ky, 0) by
trilinear interpolation (:func:`project_ft`); its exact adjoint, the transpose of the same
interpolation weights, is :class:`hetplugin.core.reconstruct.Backprojector`. Image frequencies
(kx, ky) are in index units of the D-box and must satisfy |k| <= D/2 - 1 so that
every interpolation neighbour lies inside the padded grid.
"""
from __future__ import annotations

import numpy as np
import torch

from .fourier import centred_dft_axis, half_plane_coords, irfft2_centered, shift_phase


def gridding_correction(box: int, pad: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real-space (D, D, D) factor sinc^2(x/P) sinc^2(y/P) sinc^2(z/P) of trilinear interpolation on the padded grid."""
    s = _gridding_axis(box, pad, device, dtype)
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def undo_gridding(volume: torch.Tensor, pad: int, inplace: bool = False) -> torch.Tensor:
    """``volume / gridding_correction``, one axis at a time: no (D, D, D) factor is made."""
    s = _gridding_axis(volume.shape[-1], pad, volume.device, volume.dtype)
    out = volume.div_(s[:, None, None]) if inplace else volume / s[:, None, None]
    return out.div_(s[None, :, None]).div_(s[None, None, :])


def _gridding_axis(box: int, pad: int, device=None, dtype=torch.float32) -> torch.Tensor:
    x = (torch.arange(box, dtype=torch.float64) - box // 2) / (pad * box)
    return (torch.sinc(x) ** 2).to(device=device, dtype=dtype)


def prepare_volume(volume: torch.Tensor, pad: int = 2, size: int | None = None, half: bool = False) -> torch.Tensor:
    """Real cube (D, D, D) -> padded centred transform (P, P, P) ready for slicing, or its central
    (size, size, size) part (the low frequencies up to size / (2 pad) in D-box index units).

    The transform goes one axis at a time, each zero-padded to P by the FFT and cropped to
    ``size`` at once, over slabs of the other axes: no (P, P, P) array is made unless it is the
    result. A padded grid of a 256-px map takes 1 GB as complex64, and the E-step needs only
    the frequencies below its resolution limit.

    With ``half`` only the half space x >= 0 is kept, (size, size, size/2) for an even ``size``:
    the map is real, so the other half is its conjugate mirror, and :func:`project_real` samples
    it there. That halves the E-step's references.
    """
    box = volume.shape[-1]
    if volume.shape[-3:] != (box, box, box):
        raise ValueError(f"volume must be a cube, got shape {tuple(volume.shape)}")
    padded = pad * box
    size = padded if size is None else int(size)
    if not 0 < size <= padded:
        raise ValueError(f"grid size {size} must be in 1..{padded}")
    if half and size % 2:
        raise ValueError(f"a half-space grid needs an even size, got {size}")
    out = undo_gridding(volume, pad)
    for dim in (-1, -2, -3):
        out = centred_dft_axis(out, dim, padded, size)
        if half and dim == -1:
            out = out[..., size // 2:].contiguous()
    return out


def frequency_mask(box: int, r_max: float | None = None) -> np.ndarray:
    """Boolean (D, D//2+1) selecting half-plane frequencies with |k| <= r_max (default and at most D/2 - 1)."""
    limit = box / 2 - 1 if r_max is None else min(float(r_max), box / 2 - 1)
    k = half_plane_coords(box)
    return np.hypot(k[..., 0], k[..., 1]) <= limit + 1e-9


def slice_grid(volume_ft: torch.Tensor) -> torch.Tensor:
    """A (P, P, P) complex grid (or its half space (P, P, P/2) from :func:`prepare_volume`) as the
    (1, 2, P, P, P) (or (1, 2, P, P, P/2)) real layout that :func:`project_ft` samples.

    Prepare it once per reference and iteration when projecting many batches.
    """
    return torch.view_as_real(volume_ft).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


PROJECT_CHUNK_POINTS = 1 << 18


def project_ft(volume_ft: torch.Tensor, rotations: torch.Tensor, coords: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Central slices: (P, P, P) complex grid, its half space (P, P, P/2) (see :func:`prepare_volume`),
    or either's :func:`slice_grid` layout; rotations (R, 3, 3), coords (M, 2) as (kx, ky) -> (R, M)
    complex, by trilinear interpolation."""
    vals = project_real(volume_ft, rotations, coords, pad)
    return torch.complex(vals[:, 0], vals[:, 1])


def project_real(volume_ft: torch.Tensor, rotations: torch.Tensor, coords: torch.Tensor, pad: int = 2,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`project_ft` as real and imaginary parts (R, 2, M), written into ``out`` when given
    (any (R, 2, M) view): the E-step scores projections in this [Re, Im] layout, so no complex
    copy of them is made."""
    grid = slice_grid(volume_ft) if volume_ft.is_complex() else volume_ft
    size, n_x = grid.shape[-2], grid.shape[-1]
    half = n_x != size
    rot = rotations.to(device=grid.device, dtype=grid.dtype)
    c = coords.to(grid.dtype)
    n_rot, m = rot.shape[0], c.shape[0]
    if out is None:
        out = torch.empty((n_rot, 2, m), dtype=grid.dtype, device=grid.device)
    # grid_sample's [-1, 1] units, align_corners: x from 0 in a half space, else centred like y, z
    unit = torch.tensor([2.0 / (n_x - 1), 2.0 / (size - 1), 2.0 / (size - 1)], dtype=grid.dtype, device=grid.device)
    centre = torch.tensor([0.0 if half else size // 2, size // 2, size // 2], dtype=grid.dtype, device=grid.device)
    pos_scale, offset = unit * pad, unit * centre - 1.0
    # rotations go through in chunks of ~2^18 points on the CPU: the position and sample
    # temporaries of all at once (tens of MB each) are what set the E-step's peak memory
    step = max(1, (PROJECT_CHUNK_POINTS if grid.device.type == "cpu" else 64 * PROJECT_CHUNK_POINTS) // max(m, 1))
    for start in range(0, n_rot if m else 0, step):
        pos = torch.einsum("mi,rij->rmj", c, rot[start:start + step, :2, :]).reshape(-1, 3)
        if half:
            # a frequency q with x < 0 is read at -q, conjugated
            sign = torch.where(pos[:, 0] < 0, -1.0, 1.0).to(pos.dtype)
            pos.mul_(sign[:, None])
        vals = sample_grid(grid, torch.addcmul(offset, pos, pos_scale))
        if half:
            vals[1].mul_(sign)
        out[start:start + step] = vals.reshape(2, -1, m).transpose(0, 1)
    return out


def sample_grid(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (C, N) of a (1, C, P, P, P) real grid at points (N, 3) (x, y, z in
    grid_sample's [-1, 1] units, align_corners), zero outside.

    On the CPU, grid_sample runs its 3D kernel in parallel over the batch only: with several
    threads the points go in as a batch of chunks against the same (expanded, not copied)
    grid, which is several times faster than one batch of all points.
    """
    n = points.shape[0]
    chunks = 16 if grid.device.type == "cpu" and n >= 8192 and torch.get_num_threads() > 1 else 1
    per = -(-n // chunks)
    if per * chunks != n:
        points = torch.cat([points, points.new_zeros((per * chunks - n, 3))])
    out = torch.nn.functional.grid_sample(grid.expand(chunks, -1, -1, -1, -1), points.reshape(chunks, 1, 1, per, 3),
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(chunks, grid.shape[1], per).permute(1, 0, 2).reshape(grid.shape[1], -1)[:, :n]


def project_images(volume: torch.Tensor, rotations: torch.Tensor, origins_px: torch.Tensor | None = None,
                   ctf: torch.Tensor | None = None, pad: int = 2, r_max: float | None = None,
                   prepared: torch.Tensor | None = None) -> torch.Tensor:
    """Real projections (R, D, D) of a real cube with rotations (R, 3, 3), optional origins (R, 2) and CTF.

    Origins are RELION's (rlnOriginX/Y, here in pixels): the projected content is
    moved by -origin, as relion_project does. ``ctf`` is (R, M) on the half-plane
    frequencies selected by :func:`frequency_mask` (r_max). ``prepared`` is
    ``slice_grid(prepare_volume(volume, pad))`` when the caller projects the same
    volume in several batches (it saves the padded 3D transform per call).
    """
    box = volume.shape[-1]
    dtype = volume.dtype
    sel = torch.as_tensor(frequency_mask(box, r_max), device=volume.device)
    k = torch.as_tensor(half_plane_coords(box), dtype=dtype, device=volume.device)[sel]
    grid = slice_grid(prepare_volume(volume, pad)) if prepared is None else prepared
    vals = project_ft(grid, rotations.to(dtype), k, pad)
    if origins_px is not None:
        o = origins_px.to(device=volume.device, dtype=dtype)
        vals = vals * shift_phase(k[:, 0], k[:, 1], -o[:, 0], -o[:, 1], box)
    if ctf is not None:
        vals = vals * ctf
    full = torch.zeros((rotations.shape[0], box, box // 2 + 1), dtype=vals.dtype, device=volume.device)
    full[:, sel] = vals
    return irfft2_centered(full, box)
