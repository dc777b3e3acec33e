"""CTF-weighted Fourier reconstruction from images at known poses.

An image X with CTF c at rotation A contributes c * X to the data grid and c^2 to
the weight grid (both through :func:`backproject_ft`); the map is then
F = data / (weight + reg), with a per-shell Wiener term reg = <weight>_shell /
(T * SNR_shell) when a spectral SNR is known (from a half-set FSC), else a small
floor. Images are given as half-plane transforms on the frequencies selected by
:func:`hetplugin.core.projection.frequency_mask`, already centred (origin undone).
"""
from __future__ import annotations

import numpy as np
import torch

from .fourier import half_plane_coords, pad_ft_grid, radius
from .projection import backproject_ft, frequency_mask, hermitian_symmetrize, volume_from_ft


class Backprojector:
    """Accumulates data and weight grids for one volume of box ``box`` (padded by ``pad``)."""

    def __init__(self, box: int, pad: int = 2, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, r_max: float | None = None, grid_box: int | None = None):
        """``grid_box`` (even, <= box) crops the accumulation grids to frequencies |k| < grid_box/2:
        frequency marching keeps them small while the resolution is low; maps still come out at ``box``."""
        if box % 2:
            raise ValueError(f"box {box} is odd: reconstruction needs an even box (re-window the particles)")
        grid_box = box if grid_box is None else int(grid_box)
        if grid_box % 2 or grid_box > box:
            raise ValueError(f"grid box {grid_box} must be even and at most the box {box}")
        self.box, self.pad, self.dtype, self.grid_box = box, pad, dtype, grid_box
        self.device = torch.device(device)
        self.size = pad * grid_box
        r_max = grid_box / 2 - 1 if r_max is None else min(r_max, grid_box / 2 - 1)
        sel = frequency_mask(box, r_max)
        self.select = torch.as_tensor(sel, device=self.device)
        k = half_plane_coords(box)[sel]
        self.coords = torch.as_tensor(k, dtype=dtype, device=self.device)
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.data = torch.zeros((self.size,) * 3, dtype=cdtype, device=self.device)
        self.weight = torch.zeros((self.size,) * 3, dtype=dtype, device=self.device)

    def insert(self, images_ft: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor | None = None,
               image_weights: torch.Tensor | None = None, coords: torch.Tensor | None = None) -> None:
        """Add images (n, M) (centred half-plane transforms) at rotations (n, 3, 3).

        ``coords`` (M, 2) are the frequencies of the M columns (default ``self.coords``; any
        other set must stay within |k| <= grid_box/2 - 1 and must not repeat a frequency);
        ``ctf`` (n, M) real; ``image_weights`` (n,) e.g. class posteriors.
        """
        coords = self.coords if coords is None else coords
        half = torch.where(coords[:, 0] == 0, 0.5, 1.0).to(self.dtype)
        w = half[None, :].expand(images_ft.shape[0], -1)
        if image_weights is not None:
            w = w * image_weights.to(self.dtype)[:, None]
        if ctf is None:
            vals, wts = images_ft * w, w
        else:
            vals, wts = images_ft * (ctf * w), ctf * ctf * w
        rot = rotations.to(device=self.device, dtype=self.dtype)
        backproject_ft(vals.to(self.data.dtype), rot, coords, self.size, self.pad, out=self.data)
        backproject_ft(wts.contiguous(), rot, coords, self.size, self.pad, out=self.weight)

    def add(self, other: "Backprojector") -> None:
        """Sum another accumulator into this one (e.g. per-batch or per-rank partial sums)."""
        self.data += other.data
        self.weight += other.weight

    def grids(self, symmetry: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hermitian-completed (data, weight) grids, summed over the symmetry operators (G, 3, 3) if given."""
        data, weight = hermitian_symmetrize(self.data), hermitian_symmetrize(self.weight)
        if symmetry is not None and len(symmetry) > 1:
            data, weight = symmetrize_grids(data, weight, symmetry)
        return data, weight

    def shell_radius(self) -> torch.Tensor:
        """Radius of every padded-grid voxel in D-box index units (P, P, P)."""
        return torch.as_tensor(radius((self.size,) * 3) / self.pad, dtype=self.dtype, device=self.device)

    def reconstruct(self, snr_per_shell: np.ndarray | None = None, tau2_fudge: float = 1.0,
                    symmetry: np.ndarray | None = None, floor_fraction: float = 1e-3) -> torch.Tensor:
        """Real (D, D, D) map. ``snr_per_shell`` (D//2+1,) gives the Wiener term; without it a small floor."""
        data, weight = self.grids(symmetry)
        r = self.shell_radius()
        n_shells = self.box // 2 + 1
        shells = torch.round(r).long().clamp_(max=n_shells - 1)
        flat_w = weight.reshape(-1)
        flat_s = shells.reshape(-1)
        inside = flat_w > 0
        sums = torch.zeros(n_shells, dtype=self.dtype, device=self.device).index_add_(0, flat_s[inside], flat_w[inside])
        counts = torch.zeros(n_shells, dtype=self.dtype, device=self.device).index_add_(
            0, flat_s[inside], torch.ones_like(flat_w[inside]))
        mean_w = sums / counts.clamp(min=1)
        reg = floor_fraction * mean_w
        if snr_per_shell is not None:
            snr = torch.as_tensor(np.asarray(snr_per_shell), dtype=self.dtype, device=self.device)[:n_shells]
            reg = torch.maximum(reg, mean_w / (tau2_fudge * snr.clamp(min=1e-6)))
        denom = weight + reg[shells]
        ft = torch.where(weight > 0, data / denom, torch.zeros_like(data))
        ft = torch.where(r <= self.grid_box / 2 - 1 + 1e-6, ft, torch.zeros_like(ft))
        return volume_from_ft(pad_ft_grid(ft, self.pad * self.box), self.box, self.pad)


def symmetrize_grids(data: torch.Tensor, weight: torch.Tensor, symmetry: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum grids over the point-group operators L: G(q) -> sum_L G(L^T q), by trilinear resampling."""
    size = data.shape[-1]
    ops = torch.as_tensor(np.asarray(symmetry), dtype=weight.dtype, device=weight.device)
    axis = torch.arange(size, dtype=weight.dtype, device=weight.device) - size // 2
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    pos = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    out_d, out_w = torch.zeros_like(data), torch.zeros_like(weight)
    sample = torch.cat([torch.view_as_real(data).permute(3, 0, 1, 2), weight[None]], 0)[None]
    for op in ops:
        if torch.allclose(op, torch.eye(3, dtype=op.dtype, device=op.device), atol=1e-6):
            out_d += data
            out_w += weight
            continue
        q = pos @ op  # row vectors q^T L = (L^T q)^T
        g = ((q + size // 2) * (2.0 / (size - 1)) - 1.0).reshape(1, size, size, size, 3)
        res = torch.nn.functional.grid_sample(sample, g, mode="bilinear", padding_mode="zeros",
                                              align_corners=True)[0]
        out_d += torch.view_as_complex(res[:2].permute(1, 2, 3, 0).contiguous())
        out_w += res[2]
    return out_d, out_w


def backproject_dataset(dataset, rows: np.ndarray, batch_size: int = 256, r_max: float | None = None,
                        image_weights: np.ndarray | None = None, pad: int = 2, log=None) -> Backprojector:
    """Backproject ``rows`` of a :class:`~hetplugin.core.dataset.ParticleDataset` at their own poses."""
    bp = Backprojector(dataset.box, pad, dataset.device, dataset.dtype, r_max)
    rotations = dataset.rotations()
    done = 0
    for batch in dataset.batches(batch_size, rows):
        ft = dataset.images_ft(batch, bp.select, bp.coords)
        rot = torch.as_tensor(rotations[batch], dtype=dataset.dtype, device=dataset.device)
        w = None if image_weights is None else torch.as_tensor(image_weights[batch], device=dataset.device)
        bp.insert(ft, rot, dataset.ctf(batch, bp.coords), w)
        done += len(batch)
        if log is not None:
            log(f"backprojected {done}/{len(rows)} particles")
    return bp
