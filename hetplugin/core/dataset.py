"""Particles as the engines see them: a STAR table, its image stacks and CTFs, read in batches.

Images are read where they lie (MRC stacks, by index, with positional reads) one batch at
a time; nothing is loaded whole. Fourier work happens on half-plane frequency
sets (see :mod:`hetplugin.core.fourier`), usually cropped to a resolution limit.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .ctf import CTFParams, ctf_values
from .fourier import half_plane_coords, rfft2_centered, shift_phase
from .mrc import StackReader, check_images
from .projection import frequency_mask
from .rotations import euler_to_matrix
from .starfile import ParticleTable


class ParticleDataset:
    """A particle table with image access and per-particle geometry as arrays."""

    def __init__(self, table: ParticleTable, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 use_ctf: bool = True, intact_first_peak: bool = False):
        if len(table) == 0:
            raise ValueError(f"{table.star_path}: the STAR file holds no particles")
        box_y, box_x = check_images(table.image_path, table.image_index)
        self.table = table
        self.box = int(box_x)
        sizes = np.unique(np.round(np.asarray(table.pixel_size_A, dtype=np.float64), 4))
        if len(sizes) > 1:
            raise ValueError(f"{table.star_path}: particles have several pixel sizes {sizes.tolist()}; "
                             "rescale them to one pixel size (e.g. re-extract) before processing them together")
        self.pixel_size_A = float(sizes[0])
        if use_ctf and not table.has_ctf:
            raise ValueError(f"{table.star_path}: CTF correction was asked for but the particles carry no CTF "
                             "(no rlnDefocusU); estimate the CTF first, or switch CTF correction off")
        self.ctf_params = CTFParams.from_table(table) if use_ctf else None
        self.intact_first_peak = intact_first_peak
        self.device = torch.device(device)
        self.dtype = dtype
        self.reader = StackReader(table.image_path, table.image_index)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_alignment(self) -> bool:
        return self.table.has_alignment

    def rotations(self) -> np.ndarray:
        """(N, 3, 3) rotation matrices of the particles' current alignment."""
        t = self.table
        if not t.has_alignment:
            raise ValueError(f"{t.star_path}: the particles have no alignment (no rlnAngleRot/Tilt/Psi)")
        return euler_to_matrix(t.rot_deg, t.tilt_deg, t.psi_deg)

    def origins_px(self) -> np.ndarray:
        """(N, 2) RELION origins in pixels (zero without alignment)."""
        t = self.table
        if t.shift_x_A is None:
            return np.zeros((len(t), 2))
        return np.stack([t.shift_x_A, t.shift_y_A], 1) / self.pixel_size_A

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Row indices in consecutive batches (rows sorted so that reads stay sequential per stack)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """Real images (n, D, D) of ``rows``."""
        return torch.as_tensor(self.reader.read(np.asarray(rows)), dtype=self.dtype, device=self.device)

    def coords(self, r_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(select mask (D, D//2+1) bool, coords (M, 2) (kx, ky)) of half-plane frequencies with |k| <= r_max."""
        sel = torch.as_tensor(frequency_mask(self.box, r_max), device=self.device)
        k = torch.as_tensor(half_plane_coords(self.box), dtype=self.dtype, device=self.device)[sel]
        return sel, k

    def images_ft(self, rows: np.ndarray, select: torch.Tensor, coords: torch.Tensor,
                  centre: bool = True) -> torch.Tensor:
        """Half-plane transforms (n, M) on ``coords``; with ``centre`` the particles' origins are undone."""
        ft = rfft2_centered(self.images(rows))[:, select]
        if centre and self.table.shift_x_A is not None:
            o = torch.as_tensor(self.origins_px()[rows], dtype=self.dtype, device=self.device)
            ft = ft * shift_phase(coords[:, 0], coords[:, 1], o[:, 0], o[:, 1], self.box)
        return ft

    def ctf(self, rows: np.ndarray, coords: torch.Tensor) -> torch.Tensor | None:
        """CTF (n, M) of ``rows`` on ``coords`` (None when CTF correction is off)."""
        if self.ctf_params is None:
            return None
        return ctf_values(self.ctf_params, coords[:, 0], coords[:, 1], self.box, self.pixel_size_A,
                          np.asarray(rows), self.intact_first_peak)

    def close(self) -> None:
        self.reader.close()
