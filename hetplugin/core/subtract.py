"""Signal subtraction: remove unwanted density from particle images, recentre and re-box them.

For particle i with rotation A_i, RELION origin o_i, CTF_i and class k_i:

    X'_i = X_i - s_i * CTF_i . P_{A_i, o_i}(V_{k_i} * W),   W = 1 - M  (mask meaning 'keep')
                                                            W = M      (mask meaning 'subtract')

P is the Fourier central-slice projector of :mod:`hetplugin.core.projection` (padded
grid prepared once per map), applied on the half-plane frequencies |k| <= D/2 - 1;
the origin moves the projection by -o_i, as RELION's origins do. ``V_k`` is one map
for every particle, or the map of the particle's class (rlnClassNumber) when several
maps are given. With a low-pass (``lowpass_A``), the masked density V_k * W is filtered
(raised-cosine edge of 2 shells) and only frequencies inside the filter are projected and
subtracted: nothing beyond that resolution is taken from the images (nor costs time).

Scale s_i: 1 ('none'), or the least-squares amplitude of the FULL map's projection
C = CTF . P(V) against the image, s_i = sum w Re(conj(C) X) / sum w |C|^2 over the
half plane without k = 0 (w: Hermitian weights), one value per particle ('particle')
or per resolution band ('shell', ``scale_shells`` bands of equal width in |k|, each
shrunk towards the particle's overall value in proportion to the band's noise, see
:func:`fit_scales`). Using
the full map rather than its subtracted part keeps the fit unbiased by the kept
density. s_i is stored on every output particle (``hetSubtractionScale``; bands in
``hetSubtractionScaleShellNN``).

Recentring (geometry in pixels, (x, y) from the image centre D // 2; a 3D point r of
the map lands in the image at (A r)[:2] - o):
  c      3D centre in the map (x, y, z), Angstrom from the box centre: the centre of
         mass of the kept density (max(V, 0) times the kept weight, averaged over the
         maps), or given explicitly;
  p_i    = (A_i c)[:2] - o_i, where c falls in image i;
  n_i    = round(p_i / pixel) (integer pixels); the image is translated by t_i = -n_i
         (content moves by t_i, circularly, exact: no interpolation);
  o'_i   = n_i * pixel - p_i  (|o'_i| <= half a pixel), the new rlnOriginX/YAngst.
With (A_i, o'_i) the recentred image is the projection of the map RE-CENTRED at c,
V_c(r) = V(r + c): reconstructing the output particles gives the kept region with c
at the box centre. Windowing to a smaller even box cuts the central window (the
centre index D//2 maps to D'//2), so origins are unchanged by it. Origin priors
(rlnOriginX/YPriorAngst) get the same change.

Recorded per particle for revert: rlnImageOriginalName (RELION's label, 'index@stack'
of the input image), hetRecentreShiftX/YAngst (t_i * pixel), hetRecentreCentreX/Y/ZAngst
(c) and hetOriginalOriginX/YAngst (o_i). :func:`revert_particles` carries any later
alignment (A, o') back to the original images: o = o' + t + (A c)[:2]; where the
alignment is still the one written here, the stored o_i is restored bit for bit.

On the CPU, the particles are split into contiguous ranges of whole batches, each processed
by a worker process with one torch thread (:mod:`hetplugin.core.workers`; ``workers``, the
command's --threads), forked once the maps are prepared. Every particle's place in the
output stacks is known in advance, so each worker writes its own images; worker runs give the
results of a one-thread run whatever the number of workers.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import torch

from .dataset import ParticleDataset
from .device import resolve_device, set_threads
from .focused import centre_of_mass_px
from .fourier import half_plane_hermitian_weights, lowpass_volume
from .masks import check_mask
from .mrc import check_images, read_volume, strip_format_suffix
from .projection import prepare_volume, sample_grid, slice_grid
from .rotations import euler_to_matrix
from .starfile import ParticleTable, read_particles, write_particles
from .workers import Progress, batch_ranges, run_in_workers, worker_count

MASK_MEANINGS = ("keep", "subtract")
SCALE_MODES = ("none", "particle", "shell")
PRECISIONS = {"float32": np.float32, "float16": np.float16}

# labels written on the subtracted particles
ORIGINAL_NAME = "rlnImageOriginalName"
SCALE = "hetSubtractionScale"
SHIFT = ("hetRecentreShiftXAngst", "hetRecentreShiftYAngst")
CENTRE = ("hetRecentreCentreXAngst", "hetRecentreCentreYAngst", "hetRecentreCentreZAngst")
ORIGINAL_ORIGIN = ("hetOriginalOriginXAngst", "hetOriginalOriginYAngst")
PRIORS = ("rlnOriginXPriorAngst", "rlnOriginYPriorAngst")


def shell_scale_label(band: int) -> str:
    """Label of the scale of resolution band ``band`` (1-based) in 'shell' mode."""
    return f"hetSubtractionScaleShell{band:02d}"


@dataclass
class SubtractOptions:
    """What to subtract and how to write it (see the module docstring)."""
    mask_meaning: str = "keep"          # 'keep': the mask marks what stays; 'subtract': what goes
    lowpass_A: float | None = None      # subtract only below this resolution, A (None: to Nyquist)
    scale: str = "none"                 # 'none', 'particle', 'shell'
    scale_shells: int = 4               # resolution bands in 'shell' mode
    recentre: bool = False              # move the kept region's centre to the box centre
    centre_A: tuple[float, float, float] | None = None   # explicit 3D centre (x, y, z), A from the box centre
    new_box: int | None = None          # window to this (even) box
    precision: str = "float32"          # output stacks: 'float32' or 'float16'
    ignore_class: bool = False          # one map for all even when rlnClassNumber is present
    batch_size: int = 256
    stack_size: int = 10000             # images per output stack file
    workers: int = 0                    # CPU worker processes (0: torch's thread count); see workers.worker_count
    pad: int = 2

    def check(self, box: int) -> None:
        if self.mask_meaning not in MASK_MEANINGS:
            raise ValueError(f"mask meaning '{self.mask_meaning}' must be one of {MASK_MEANINGS}: 'keep' if the "
                             "mask marks the region to keep, 'subtract' if it marks the region to remove")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale '{self.scale}' must be one of {SCALE_MODES}")
        if self.scale == "shell" and not 1 <= int(self.scale_shells) <= box // 2 - 1:
            raise ValueError(f"scale_shells must lie in [1, {box // 2 - 1}] for a box of {box}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' must be float32 or float16")
        if self.new_box is not None:
            nb = int(self.new_box)
            if nb % 2 or nb < 2:
                raise ValueError(f"new box {nb} must be even and positive (RELION and the core need even boxes)")
            if nb > box:
                raise ValueError(f"new box {nb} is larger than the particles' box {box}: it can only shrink")
        if self.lowpass_A is not None and self.lowpass_A <= 0:
            raise ValueError("the low-pass resolution must be positive (or None for no filter)")
        if self.batch_size < 1 or self.stack_size < 1:
            raise ValueError("batch_size and stack_size must be positive")
        if self.workers < 0:
            raise ValueError("workers must be 0 (torch's thread count) or positive")


# ------------------------------------------------------------------ geometry
def kept_weight(mask: np.ndarray, meaning: str) -> np.ndarray:
    """Weight of the region that stays in the images: M ('keep') or 1 - M ('subtract')."""
    return mask if meaning == "keep" else 1.0 - mask


def kept_centre_px(maps: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Centre of mass (x, y, z) in pixels from the box centre of max(mean map, 0) * keep."""
    density = np.maximum(np.asarray(maps, np.float64).reshape((-1,) + keep.shape).mean(0), 0.0) * keep
    centre = centre_of_mass_px(density)
    if centre is None:
        raise ValueError("the kept region holds no positive density: cannot find its centre of mass; "
                         "check the mask meaning, or give the centre explicitly")
    return centre


def recentre_geometry(rotations: np.ndarray, origins_A: np.ndarray, centre_A: np.ndarray,
                      pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(integer translation t (n, 2) in pixels applied to the images, new origins (n, 2) in A).

    p = (A c)[:2] - o (A) is where the centre c falls; t = -round(p / pixel); o' = -t * pixel - p.
    Deterministic: :func:`revert_particles` recomputes it to recognise unchanged alignments.
    """
    p = np.einsum("nij,j->ni", np.asarray(rotations, np.float64)[:, :2, :], np.asarray(centre_A, np.float64))
    p = p - np.asarray(origins_A, np.float64)
    n = np.round(p / pixel_size_A)
    return -n.astype(np.int64), n * pixel_size_A - p


def translate_window(images: torch.Tensor, shifts_px: np.ndarray | None, new_box: int) -> torch.Tensor:
    """Translate images (n, D, D) by integer shifts (n, 2) (x, y; circular) and cut the central new_box window."""
    n, box = images.shape[0], images.shape[-1]
    start = box // 2 - new_box // 2
    idx = torch.arange(new_box, device=images.device) + start
    if shifts_px is None:
        return images[:, start:start + new_box, start:start + new_box]
    t = torch.as_tensor(shifts_px, device=images.device, dtype=torch.long)
    rows = (idx[None, :] - t[:, 1:2]) % box          # out[y] = in[y - t_y]
    cols = (idx[None, :] - t[:, 0:1]) % box
    b = torch.arange(n, device=images.device)[:, None, None]
    return images[b, rows[:, :, None], cols[:, None, :]]


# ------------------------------------------------------------------ projection of the subtracted density
def _sample(grid: torch.Tensor, rotations: torch.Tensor, coords: torch.Tensor, pad: int) -> torch.Tensor:
    """Trilinear central slices of a (1, 2C, P, P, P) real grid: (C, R, M) complex.

    The same sampling as :func:`hetplugin.core.projection.project_ft`, for several channels
    at once (the subtracted and the kept parts), with the points visited in order of their
    z layer in the grid: consecutive reads then stay within two layers, which keeps the
    grid in cache and makes the interpolation about 1.5x faster than in image order.
    """
    size = grid.shape[-1]
    rot = rotations.to(device=grid.device, dtype=grid.dtype)
    pos = torch.einsum("mi,rij->rmj", coords.to(grid.dtype), rot[:, :2, :] * (2.0 * pad / (size - 1)))
    pos = (pos + (2.0 * (size // 2) / (size - 1) - 1.0)).reshape(-1, 3)     # grid_sample's [-1, 1] units
    order = None
    if grid.device.type == "cpu":
        layer = ((pos[:, 2] + 1.0) * (0.5 * (size - 1))).clamp_(0, size - 1)
        order = torch.argsort(layer.to(torch.uint8 if size <= 256 else torch.int16), stable=True)
        pos = pos.index_select(0, order)
    out = sample_grid(grid, pos)
    out = torch.complex(out[0::2], out[1::2])
    if order is not None:
        out = torch.empty_like(out).index_copy_(1, order, out)
    return out.reshape(-1, rotations.shape[0], coords.shape[0])


def _shift_phase_separable(kx: torch.Tensor, ky: torch.Tensor, shift_x_px: torch.Tensor, shift_y_px: torch.Tensor,
                           box: int) -> torch.Tensor:
    """:func:`hetplugin.core.fourier.shift_phase` for integer frequency sets, as a product of per-axis factors.

    exp(-2 pi i (kx sx + ky sy) / D) = ex(kx) ey(ky): 1.5 D exponentials per image instead of one
    per frequency, gathered on the M frequencies.
    """
    axis = torch.arange(-(box // 2), box // 2 + 1, device=kx.device, dtype=shift_x_px.dtype)
    ex = torch.polar(torch.ones(1, device=kx.device, dtype=axis.dtype),
                     (-2.0 * math.pi / box) * shift_x_px[:, None] * axis[None, :])
    ey = torch.polar(torch.ones(1, device=kx.device, dtype=axis.dtype),
                     (-2.0 * math.pi / box) * shift_y_px[:, None] * axis[None, :])
    return ex.index_select(1, kx.long() + box // 2) * ey.index_select(1, ky.long() + box // 2)


class MapProjector:
    """Prepared grids of the density to subtract (and, for scale fitting, the kept density) per map."""

    def __init__(self, maps: np.ndarray, mask: np.ndarray, meaning: str, pixel_size_A: float,
                 lowpass_A: float | None = None, with_kept: bool = False, pad: int = 2,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.pad = pad
        keep = torch.as_tensor(kept_weight(mask, meaning), dtype=dtype, device=device)
        self.grids = []
        for vol in np.asarray(maps, np.float32).reshape((-1,) + mask.shape):
            v = torch.as_tensor(vol, dtype=dtype, device=device)
            parts = [v * (1.0 - keep)] + ([v * keep] if with_kept else [])
            if lowpass_A:      # after masking, so that what is projected is band-limited
                parts = [lowpass_volume(p, lowpass_A, pixel_size_A) for p in parts]
            grid = torch.cat([slice_grid(prepare_volume(p, pad)) for p in parts], 1)
            self.grids.append(grid)

    def __len__(self) -> int:
        return len(self.grids)

    def project(self, map_index: np.ndarray, rotations: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(C, n, M) projections of the map of each particle (C = 1, or 2 with the kept part)."""
        maps = np.unique(map_index)
        if len(maps) == 1:
            return _sample(self.grids[int(maps[0])], rotations, coords, self.pad)
        out = None
        for k in maps:
            sel = np.flatnonzero(map_index == k)
            vals = _sample(self.grids[int(k)], rotations[sel], coords, self.pad)
            if out is None:
                out = torch.zeros((vals.shape[0], len(map_index), coords.shape[0]), dtype=vals.dtype,
                                  device=vals.device)
            out[:, torch.as_tensor(sel, device=vals.device)] = vals
        return out


def fit_scales(images: torch.Tensor, model: torch.Tensor, band: torch.Tensor, n_bands: int,
               weights: torch.Tensor, prior_sd: float = 0.2) -> torch.Tensor:
    """Least-squares amplitude (n, B) of ``model`` against ``images`` (both (n, M) complex) per band.

    ``band`` (M,) long: band of each frequency (-1 excludes it); ``weights`` (M,) Hermitian weights.
    With several bands, each band's estimate num_b / den_b is shrunk towards the particle's
    all-band value s with a Gaussian prior of width ``prior_sd``: s_b = (2 num_b / v_b + s / t^2) /
    (2 den_b / v_b + 1 / t^2), v_b the band's noise power per coefficient estimated from the
    batch's residuals; noise-free bands keep their own least-squares value.
    """
    num_c = weights * (model.conj() * images).real
    den_c = weights * (model.real ** 2 + model.imag ** 2)
    ok = band >= 0
    b = band.clamp(min=0)[ok]
    n = images.shape[0]
    num = torch.zeros((n, n_bands), dtype=num_c.dtype, device=num_c.device).index_add_(1, b, num_c[:, ok])
    den = torch.zeros_like(num).index_add_(1, b, den_c[:, ok])
    total = num.sum(1) / den.sum(1).clamp(min=1e-30)
    if n_bands == 1:
        return total[:, None]
    resid = images - total[:, None] * model
    power = (weights * (resid.real ** 2 + resid.imag ** 2))[:, ok].sum(0)
    count = weights[ok] * n
    noise = torch.zeros(n_bands, dtype=num.dtype, device=num.device).index_add_(0, b, power)
    noise = noise / torch.zeros_like(noise).index_add_(0, b, count).clamp(min=1e-30)
    precision = 2.0 * den / noise.clamp(min=1e-30)[None, :]
    shrunk = (2.0 * num / noise.clamp(min=1e-30)[None, :] + total[:, None] / prior_sd ** 2) / \
        (precision + 1.0 / prior_sd ** 2)
    return torch.where(den > 0, shrunk, total[:, None])


# ------------------------------------------------------------------ output stacks
class OutputStacks:
    """The output MRC stacks (float32/float16), created whole before any image is computed.

    Particle i goes to stack i // stack_size + 1 at index i % stack_size + 1: with every place
    known in advance, worker processes write their own particle ranges independently, straight
    to the files at their byte offsets (memory stays at one batch). Each writer accumulates the
    header statistics of what it wrote (:meth:`new_statistics`, :meth:`write`); they are merged
    and set once at the end (:meth:`set_statistics`).
    """

    def __init__(self, folder: Path, prefix: str, n_images: int, box: int, pixel_size_A: float,
                 dtype=np.float32, stack_size: int = 10000):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.n, self.dtype, self.stack_size = n_images, np.dtype(dtype), stack_size
        self.paths: list[str] = []
        self._headers, self._offsets = [], []
        for number, first in enumerate(range(0, n_images, stack_size)):
            path = (folder / f"{prefix}_{number + 1:03d}.mrcs").resolve()
            with mrcfile.new_mmap(str(path), shape=(min(stack_size, n_images - first), box, box),
                                  mrc_mode=12 if self.dtype == np.float16 else 2, overwrite=True) as handle:
                handle.set_image_stack()
                handle.voxel_size = pixel_size_A
                self._headers.append(handle.header.copy())
                self._offsets.append(handle.header.nbytes + handle.extended_header.nbytes)
            self.paths.append(str(path))

    def names(self) -> tuple[np.ndarray, np.ndarray]:
        """Stack path and 1-based index in it of every particle."""
        i = np.arange(self.n)
        return np.array(self.paths, dtype=object)[i // self.stack_size], i % self.stack_size + 1

    def new_statistics(self) -> np.ndarray:
        """Empty running statistics for :meth:`write`: (stacks, 5) min, max, sum, sum of squares, count."""
        stats = np.zeros((len(self.paths), 5))
        stats[:, 0], stats[:, 1] = np.inf, -np.inf
        return stats

    def write(self, first: int, images: np.ndarray, stats: np.ndarray) -> None:
        """Write images (n, box, box) of particles ``first``, ``first`` + 1, ... and add them to ``stats``."""
        if self.dtype == np.float16 and max(-float(images.min()), float(images.max())) > 65000:
            raise ValueError("image values exceed the float16 range (65504): normalise the particles "
                             "(e.g. RELION's extraction does) or write float32")
        data = np.ascontiguousarray(images, dtype=self.dtype)
        stored = data.astype(np.float32, copy=False).reshape(len(data), -1)    # the values as written
        pos = 0
        while pos < len(data):
            number, within = divmod(first + pos, self.stack_size)
            take = min(len(data) - pos, self.stack_size - within)
            with open(self.paths[number], "r+b") as f:
                f.seek(self._offsets[number] + within * data[0].nbytes)
                f.write(data[pos:pos + take].data)
            # per image in float32, over images in float64 (header statistics only):
            # a fraction of the cost of converting the whole batch to float64
            chunk, st = stored[pos:pos + take], stats[number]
            st[0], st[1] = min(st[0], float(chunk.min())), max(st[1], float(chunk.max()))
            st[2] += chunk.sum(1).sum(dtype=np.float64)
            st[3] += np.einsum("ij,ij->i", chunk, chunk).sum(dtype=np.float64)
            st[4] += chunk.size
            pos += take

    def set_statistics(self, parts: list[np.ndarray]) -> None:
        """Set each stack's dmin, dmax, dmean and rms from the writers' statistics.

        Only the header is rewritten, in place: reopening the stack with mrcfile would map the
        whole file and flush it to disk (msync) on closing.
        """
        parts = np.stack(parts)
        lows, highs = parts[:, :, 0].min(0), parts[:, :, 1].max(0)
        sums, squares, counts = parts[:, :, 2:].sum(0).T
        for path, header, lo, hi, s, s2, count in zip(self.paths, self._headers, lows, highs, sums, squares, counts):
            mean = s / max(count, 1)
            header.dmin, header.dmax, header.dmean = lo, hi, mean
            header.rms = math.sqrt(max(s2 / max(count, 1) - mean * mean, 0.0))
            with open(path, "r+b") as f:
                f.write(header.tobytes())


# ------------------------------------------------------------------ the engine
def _image_names(paths, index) -> np.ndarray:
    return np.array(["%06d@%s" % (int(i), p) for i, p in zip(index, paths)], dtype=object)


def _class_index(table: ParticleTable, n_maps: int, ignore_class: bool) -> np.ndarray:
    """0-based map per particle: 0 for one map, else rlnClassNumber - 1."""
    if n_maps == 1 or ignore_class:
        return np.zeros(len(table), np.int64)
    if table.class_number is None:
        raise ValueError(f"{n_maps} maps were given (one per class) but the particles carry no rlnClassNumber; "
                         "give one map, or particles from a classification")
    cls = np.asarray(table.class_number, np.int64)
    bad = (cls < 1) | (cls > n_maps)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} particle(s) have rlnClassNumber outside 1..{n_maps} (e.g. "
                         f"{int(cls[bad][0])}); give one map per class, in class order")
    return cls - 1


def require_pose_and_ctf(table: ParticleTable) -> None:
    """Refuse particles without projection alignment or CTF."""
    if not table.has_alignment:
        raise ValueError(f"{table.star_path}: the particles have no alignment (rlnAngleRot/Tilt/Psi): "
                         "subtraction projects the map at each particle's pose; refine them first")
    if not table.has_ctf:
        raise ValueError(f"{table.star_path}: the particles carry no CTF (rlnDefocusU): subtraction needs "
                         "each particle's CTF; estimate it first")


def check_inputs(table: ParticleTable, maps: np.ndarray, mask: np.ndarray, box: int, pixel_size_A: float,
                 map_pixels: list | None = None, mask_pixel: float | None = None) -> None:
    """Refuse inputs that cannot be subtracted: no alignment/CTF, boxes or pixel sizes that differ, bad mask."""
    require_pose_and_ctf(table)
    for what, shape in [("map", m.shape) for m in maps] + [("mask", mask.shape)]:
        if tuple(shape) != (box,) * 3:
            raise ValueError(f"the {what} is {shape[-1]} px but the particles are {box} px: resample it to the "
                             "particles' box and pixel size")
    for what, px in [("map", p) for p in (map_pixels or [])] + [("mask", mask_pixel)]:
        if px and abs(px - pixel_size_A) > 0.01 * pixel_size_A:
            raise ValueError(f"the {what} has {px:.4f} A/px but the particles {pixel_size_A:.4f} A/px: resample it")
    check_mask(mask, "mask")


@dataclass
class _Plan:
    """What the batch loop needs, prepared once: worker processes inherit it when they are forked."""
    ds: ParticleDataset
    projector: MapProjector
    stacks: OutputStacks
    rotations: np.ndarray        # (N, 3, 3)
    origins_A: np.ndarray        # (N, 2) RELION origins
    cls: np.ndarray              # (N,) map of each particle
    shifts: np.ndarray | None    # (N, 2) integer recentring shifts (px); None: no recentring
    new_box: int
    coords: torch.Tensor         # (M, 2) half-plane frequencies subtracted
    flat: torch.Tensor           # (M,) their places in the flattened plain half-plane transform, kx-major
    weights: torch.Tensor        # (M,) Hermitian weights
    band: torch.Tensor           # (M,) scale band of each frequency (-1: k = 0)
    n_bands: int
    with_kept: bool              # fit scales (the kept density is projected too)
    batch_size: int


def _subtract_batch(plan: _Plan, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Subtracted (recentred, windowed) images (n, D', D') of ``rows`` and their scales (n, B) (None: not fitted)."""
    ds, k = plan.ds, plan.coords
    box, px = ds.box, ds.pixel_size_A
    images = ds.images(rows)
    rot = torch.as_tensor(plan.rotations[rows], dtype=ds.dtype, device=ds.device)
    o = torch.as_tensor(box / 2 - plan.origins_A[rows] / px, dtype=ds.dtype, device=ds.device)
    modulation = _shift_phase_separable(k[:, 0], k[:, 1], o[:, 0], o[:, 1], box) * ds.ctf(rows, k)
    proj = plan.projector.project(plan.cls[rows], rot, k) * modulation[None]
    # Half-plane transforms are laid out kx-major, (n, D/2 + 1, D): transforms over dims (-1, -2) of
    # the transposed images, real axis x second; torch's inverse real transform is 1.3-1.7x faster so.
    subtracted, scales = proj[0], None
    if plan.with_kept:
        x = torch.fft.rfft2(images.transpose(-1, -2), dim=(-1, -2)).reshape(len(rows), -1).index_select(1, plan.flat)
        scales = fit_scales(x, proj[0] + proj[1], plan.band, plan.n_bands, plan.weights)
        subtracted = scales[:, plan.band.clamp(min=0)] * subtracted
    # X - F^-1(s P) (the transform is linear): no forward transform of the images but for the fit,
    # and the frequencies not subtracted skip a transform round trip
    spectrum = torch.zeros((len(rows), (box // 2 + 1) * box), dtype=subtracted.dtype, device=ds.device)
    spectrum.index_copy_(1, plan.flat, subtracted)
    spectrum = spectrum.reshape(len(rows), box // 2 + 1, box)
    images = images.sub_(torch.fft.irfft2(spectrum, s=(box, box), dim=(-1, -2)).transpose(-1, -2))
    if plan.shifts is not None or plan.new_box != box:
        images = translate_window(images, None if plan.shifts is None else plan.shifts[rows], plan.new_box)
    return images, scales


def _subtract_range(plan: _Plan, first: int, stop: int, report: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
    """Subtract particles ``first`` .. ``stop`` - 1 batch by batch and write them at their places in the stacks.

    The one batch loop, run in-process or by each worker process on its range. ``report(done)``
    is called after each batch with the number of the range's particles done. Returns their
    scales (stop - first, bands) and the statistics of what was written (see :class:`OutputStacks`).
    """
    scales = np.ones((stop - first, plan.n_bands))
    stats = plan.stacks.new_statistics()
    for rows in plan.ds.batches(plan.batch_size, np.arange(first, stop)):
        images, s = _subtract_batch(plan, rows)
        if s is not None:
            scales[rows - first] = s.double().cpu().numpy()
        plan.stacks.write(int(rows[0]), images.cpu().numpy(), stats)
        plan.ds.reader.close()      # unmap the input stacks: pages read so far leave the resident set
        report(int(rows[-1]) + 1 - first)
    return scales, stats


def subtract_particles(table: ParticleTable, maps: np.ndarray, mask: np.ndarray, out_dir: str | Path,
                       options: SubtractOptions | None = None, device: torch.device | str = "cpu",
                       log=print, map_pixels: list | None = None, mask_pixel: float | None = None) -> dict:
    """Subtract, recentre and re-box every particle of ``table``; write stacks and ``particles_subtracted.star``.

    ``maps`` (K, D, D, D) or (D, D, D): one map, or one per class (rlnClassNumber). Returns
    the summary also written to ``subtract.json``.
    """
    opt = options or SubtractOptions()
    maps = np.asarray(maps, np.float32)
    maps = maps[None] if maps.ndim == 3 else maps
    mask = np.asarray(mask, np.float32)
    require_pose_and_ctf(table)
    ds = ParticleDataset(table, device, use_ctf=True)
    box, px = ds.box, ds.pixel_size_A
    opt.check(box)
    check_inputs(table, maps, mask, box, px, map_pixels, mask_pixel)
    cls = _class_index(table, len(maps), opt.ignore_class)
    new_box = box if opt.new_box is None else int(opt.new_box)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(ds)
    keep = kept_weight(mask, opt.mask_meaning)
    if float(keep.max()) <= 0:
        raise ValueError("the kept region is empty: with this mask meaning nothing would remain")

    rotations = ds.rotations()
    origins_A = np.stack([table.shift_x_A, table.shift_y_A], 1).astype(np.float64)
    centre_A = np.zeros(3)
    shifts = np.zeros((n, 2), np.int64)
    new_origins_A = origins_A.copy()
    if opt.recentre:
        centre_A = (np.asarray(opt.centre_A, np.float64) if opt.centre_A is not None
                    else kept_centre_px(maps, keep) * px)
        shifts, new_origins_A = recentre_geometry(rotations, origins_A, centre_A, px)
        log(f"subtract: recentring on ({centre_A[0]:.2f}, {centre_A[1]:.2f}, {centre_A[2]:.2f}) A from the box "
            f"centre; shifts up to {int(np.abs(shifts).max())} px")

    with_kept = opt.scale != "none"
    projector = MapProjector(maps, mask, opt.mask_meaning, px, opt.lowpass_A, with_kept, opt.pad, ds.device, ds.dtype)
    # the low-passed density is zero beyond the filter's edge (cutoff + 1 shell): those frequencies need no projection
    r_max = None if not opt.lowpass_A else box * px / opt.lowpass_A + 1.0
    sel, k = ds.coords(r_max)
    # Work on the plain (uncentred) rfft2 layout: the centred transform is (-1)^(kx+ky) times it,
    # a sign folded into the projection's phase factor (a shift by D/2), so no fftshift is needed.
    # The half-plane transforms are laid out kx-major, (D/2 + 1, D): see _subtract_batch.
    ky_plain = torch.remainder(k[:, 1].long(), box)
    flat = k[:, 0].long() * box + ky_plain
    radius = torch.linalg.norm(k, dim=1)
    weights = torch.as_tensor(half_plane_hermitian_weights(box), dtype=ds.dtype, device=ds.device)[sel]
    n_bands = int(opt.scale_shells) if opt.scale == "shell" else 1
    r_top = box / 2 - 1
    band = torch.clamp((radius / (r_top + 1e-6) * n_bands).long(), max=n_bands - 1)
    band = torch.where(radius < 0.5, torch.full_like(band, -1), band)
    star = out / "particles_subtracted.star"
    for stale in (star, out / "subtract.json"):      # a former run's results would point at the new stacks
        stale.unlink(missing_ok=True)
    stacks = OutputStacks(out / "Particles", "subtracted", n, new_box, px, PRECISIONS[opt.precision], opt.stack_size)
    plan = _Plan(ds, projector, stacks, rotations, origins_A, cls, shifts if opt.recentre else None, new_box, k, flat,
                 weights, band, n_bands, with_kept, opt.batch_size)
    n_batches = math.ceil(n / opt.batch_size)
    workers = worker_count(opt.workers, ds.device, n_batches)

    log(f"subtract: {n} particles, box {box} -> {new_box}, {px:.3f} A/px, {len(maps)} map(s)"
        f"{' by class' if len(maps) > 1 and not opt.ignore_class else ''}, mask meaning '{opt.mask_meaning}', "
        f"scale {opt.scale}, low-pass {opt.lowpass_A or 'none'}, output {opt.precision}, device {ds.device}"
        f"{f', {workers} worker processes' if workers > 1 else ''}")
    progress = Progress("subtract", n, n_batches, log)
    try:
        if workers == 1:
            parts = [_subtract_range(plan, 0, n, progress.show)]
        else:
            ranges = batch_ranges(n, opt.batch_size, workers)
            parts = run_in_workers("subtract", functools.partial(_subtract_range, plan), ranges, progress)
    except BaseException:
        for path in stacks.paths:       # half-written stacks must not pass for results
            Path(path).unlink(missing_ok=True)
        raise
    finally:
        ds.close()
    scales = np.concatenate([scale for scale, _ in parts])
    stacks.set_statistics([stats for _, stats in parts])
    elapsed = time.perf_counter() - progress.start
    new_paths, new_index = stacks.names()

    updates = {ORIGINAL_NAME: _image_names(table.image_path, table.image_index),
               SCALE: scales.mean(1) if n_bands > 1 else scales[:, 0],
               SHIFT[0]: shifts[:, 0] * px, SHIFT[1]: shifts[:, 1] * px,
               CENTRE[0]: np.full(n, centre_A[0]), CENTRE[1]: np.full(n, centre_A[1]),
               CENTRE[2]: np.full(n, centre_A[2]),
               ORIGINAL_ORIGIN[0]: origins_A[:, 0], ORIGINAL_ORIGIN[1]: origins_A[:, 1]}
    if opt.scale == "shell":
        for j in range(n_bands):
            updates[shell_scale_label(j + 1)] = scales[:, j]
    columns = dict(table.columns)
    if opt.recentre and all(label in columns for label in PRIORS):
        moved = np.stack([np.asarray(columns[label], np.float64) for label in PRIORS], 1) + new_origins_A - origins_A
        columns[PRIORS[0]], columns[PRIORS[1]] = moved[:, 0], moved[:, 1]
    new_table = _retarget(table, new_paths, new_index, new_box, new_origins_A, columns)
    write_particles(star, new_table, updates)
    summary = dict(n_particles=n, box=box, new_box=new_box, pixel_size_A=px, n_maps=len(maps),
                   by_class=bool(len(maps) > 1 and not opt.ignore_class), centre_A=centre_A.tolist(),
                   options=dataclasses.asdict(opt), seconds=elapsed, images_per_second=n / max(elapsed, 1e-9),
                   scale_mean=float(scales.mean()), scale_sd=float(scales.std()),
                   particles_star=str(star), stacks=stacks.paths)
    (out / "subtract.json").write_text(json.dumps(summary, indent=1))
    log(f"subtract: wrote {star} ({n} particles, {elapsed:.1f} s, {summary['images_per_second']:.0f} images/s)")
    return summary


def _retarget(table: ParticleTable, paths, index, box: int, origins_A: np.ndarray, columns: dict) -> ParticleTable:
    """Copy of ``table`` pointing at other images (box ``box``) with other origins."""
    optics = None
    if table.optics is not None:
        optics = dict(table.optics)
        if "rlnImageSize" in optics:
            optics["rlnImageSize"] = np.full(len(optics["rlnImageSize"]), box, dtype=np.int64)
    for label in ("rlnImageSize",):
        if label in columns:
            columns[label] = np.full(len(table), box, dtype=np.int64)
    return dataclasses.replace(table, image_path=np.array(paths, dtype=object), image_index=np.asarray(index, np.int64),
                               image_size=np.full(len(table), box, dtype=np.int64), shift_x_A=origins_A[:, 0].copy(),
                               shift_y_A=origins_A[:, 1].copy(), columns=columns, optics=optics)


# ------------------------------------------------------------------ revert
def _split_name(name: str) -> tuple[int, str]:
    head, sep, tail = str(name).partition("@")
    return (int(head), tail) if sep else (1, head)


def revert_particles(table: ParticleTable, out_star: str | Path, root: str | None = None, log=print) -> ParticleTable:
    """Point subtracted particles back at their original images, with the alignment carried over.

    Needs rlnImageOriginalName. With the recentring columns of :func:`subtract_particles`, the
    current alignment (A, o') becomes o = o' + t + (A c)[:2] on the original images; where it
    is still the alignment written by the subtraction, the stored original origin is restored
    exactly. Without them (e.g. a RELION subtraction), origins are kept as they are, as
    ``relion_particle_subtract --revert`` does. The subtraction's own columns are dropped.
    """
    cols = table.columns
    if ORIGINAL_NAME not in cols:
        raise ValueError(f"{table.star_path}: no {ORIGINAL_NAME} column: these particles were not made by a "
                         "subtraction (or the column was lost), so there is nothing to revert to")
    n = len(table)
    pairs = [_split_name(v) for v in cols[ORIGINAL_NAME].tolist()]
    index = np.array([p[0] for p in pairs], np.int64)
    star_dir = Path(table.star_path).parent
    bases = [Path(root)] if root else [star_dir] + list(star_dir.parents)[:3] + [Path.cwd()]
    paths = []
    for _, name in pairs:
        name = strip_format_suffix(name)
        if not os.path.isabs(name):
            name = next((str(b / name) for b in bases if (b / name).exists()), str(bases[0] / name))
        paths.append(os.path.normpath(name))
    box_y, box_x = check_images(np.array(paths, dtype=object), index)
    px = float(np.asarray(table.pixel_size_A)[0])
    origins = np.stack([table.shift_x_A, table.shift_y_A], 1).astype(np.float64) if table.shift_x_A is not None \
        else np.zeros((n, 2))
    columns = dict(cols)
    have = all(lab in cols for lab in SHIFT + CENTRE)
    if have and table.has_alignment:
        t_A = np.stack([np.asarray(cols[lab], np.float64) for lab in SHIFT], 1)
        c_A = np.stack([np.asarray(cols[lab], np.float64) for lab in CENTRE], 1)
        rot = euler_to_matrix(table.rot_deg, table.tilt_deg, table.psi_deg)
        carried = origins + t_A + np.einsum("nij,nj->ni", rot[:, :2, :], c_A)
        reverted = carried
        if all(lab in cols for lab in ORIGINAL_ORIGIN):
            stored = np.stack([np.asarray(cols[lab], np.float64) for lab in ORIGINAL_ORIGIN], 1)
            same = np.zeros(n, bool)
            for c in np.unique(c_A, axis=0):       # one centre per subtraction, so one pass
                rows = np.flatnonzero((c_A == c).all(1))
                t_chk, o_chk = recentre_geometry(rot[rows], stored[rows], c, px)
                recentred = (t_chk * px == t_A[rows]).all(1) & (o_chk == origins[rows]).all(1)
                unshifted = (t_A[rows] == 0).all(1) & (c == 0).all() & (origins[rows] == stored[rows]).all(1)
                same[rows] = recentred | unshifted
            reverted = np.where(same[:, None], stored, carried)
            log(f"revert: {int(same.sum())} particle(s) keep their original origins exactly, "
                f"{n - int(same.sum())} carry a changed alignment over")
        if all(label in cols for label in PRIORS):
            prior = np.stack([np.asarray(cols[label], np.float64) for label in PRIORS], 1)
            prior = prior + t_A + np.einsum("nij,nj->ni", rot[:, :2, :], c_A)
            columns[PRIORS[0]], columns[PRIORS[1]] = prior[:, 0], prior[:, 1]
        origins = reverted
    else:
        log("revert: no recentring columns; origins are kept as they are")
    for label in (ORIGINAL_NAME, SCALE, *SHIFT, *CENTRE, *ORIGINAL_ORIGIN):
        columns.pop(label, None)
    for label in [c for c in columns if c.startswith("hetSubtractionScaleShell")]:
        columns.pop(label)
    new_table = _retarget(table, paths, index, int(box_x), origins, columns)
    if table.shift_x_A is None:
        new_table = dataclasses.replace(new_table, shift_x_A=None, shift_y_A=None)
    Path(out_star).parent.mkdir(parents=True, exist_ok=True)
    write_particles(out_star, new_table)
    log(f"revert: wrote {out_star} ({n} particles, box {box_x})")
    return new_table


# ------------------------------------------------------------------ commands
def add_arguments(p: argparse.ArgumentParser) -> None:
    o = SubtractOptions()
    p.add_argument("--particles", required=True, help="RELION STAR file of particles with alignment and CTF")
    p.add_argument("--map", required=True, nargs="+",
                   help="map to subtract from (e.g. the consensus map), or one map per class in class order: "
                        "each particle is then subtracted with the map of its rlnClassNumber")
    p.add_argument("--mask", required=True, help="soft mask (MRC, values in [0, 1])")
    p.add_argument("--mask-meaning", required=True, choices=MASK_MEANINGS,
                   help="'keep': the mask marks the region to keep (the map times 1 - mask is subtracted); "
                        "'subtract': it marks the region to remove (the map times the mask is subtracted)")
    p.add_argument("--out", required=True, help="output folder: particles_subtracted.star, Particles/*.mrcs, subtract.json")
    p.add_argument("--lowpass", type=float, default=0.0, help="low-pass the masked map(s) to this resolution (A): nothing finer is subtracted; 0: no filter")
    p.add_argument("--scale", choices=SCALE_MODES, default=o.scale,
                   help="per-particle amplitude of the subtracted projection: none (1), particle (least squares "
                        "of the map's projection against the image), shell (the same per resolution band)")
    p.add_argument("--scale-shells", type=int, default=o.scale_shells, help="resolution bands for --scale shell")
    p.add_argument("--recentre", action="store_true",
                   help="shift each image so that the kept region's centre of mass is at the box centre "
                        "(integer shift; the sub-pixel rest stays in the origins)")
    p.add_argument("--centre", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="recentre on this 3D point instead (A from the map's box centre; implies --recentre)")
    p.add_argument("--new-box", type=int, default=0, help="window the output to this even box (0: keep the box)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=o.precision,
                   help="output stacks: float32, or float16 (half the disk)")
    p.add_argument("--ignore-class", action="store_true", help="with one map per class, use the first map for all")
    p.add_argument("--stack-size", type=int, default=o.stack_size, help="images per output stack file")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: $HETPLUGIN_DEVICE, else auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU cores (0: torch's default): on the CPU, worker processes with one thread each over "
                        "contiguous particle ranges (at least two batches each), else torch's threads")
    p.add_argument("--batch-size", type=int, default=o.batch_size, help="particles per batch (bounds memory)")
    p.add_argument("--root", default=None, help="folder that relative image paths are relative to")


def options_from_args(a: argparse.Namespace) -> SubtractOptions:
    return SubtractOptions(mask_meaning=a.mask_meaning, lowpass_A=a.lowpass or None, scale=a.scale,
                           scale_shells=a.scale_shells, recentre=bool(a.recentre or a.centre is not None),
                           centre_A=tuple(a.centre) if a.centre is not None else None,
                           new_box=a.new_box or None, precision=a.precision, ignore_class=a.ignore_class,
                           batch_size=a.batch_size, stack_size=a.stack_size, workers=max(a.threads, 0))


def run(a: argparse.Namespace, log=print) -> dict:
    set_threads(a.threads)
    device = resolve_device(a.device)
    table = read_particles(a.particles, root=a.root)
    maps, pixels = [], []
    for path in a.map:
        vol, vpx = read_volume(path)
        maps.append(vol)
        pixels.append(vpx)
    if len({m.shape for m in maps}) > 1:
        raise ValueError(f"the maps have different boxes {[m.shape[0] for m in maps]}: they must match the particles")
    mask, mpx = read_volume(a.mask)
    return subtract_particles(table, np.stack(maps), mask, a.out, options_from_args(a), device, log,
                              map_pixels=pixels, mask_pixel=mpx)


def add_revert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="STAR file of subtracted particles (with rlnImageOriginalName)")
    p.add_argument("--out", required=True, help="output folder: particles_reverted.star")
    p.add_argument("--root", default=None, help="folder that relative image paths are relative to")
    p.add_argument("--device", default="auto", help="accepted for uniformity with other commands (no computing)")
    p.add_argument("--threads", type=int, default=0, help="accepted for uniformity with other commands")


def run_revert(a: argparse.Namespace, log=print) -> ParticleTable:
    table = read_particles(a.particles, root=a.root)
    return revert_particles(table, Path(a.out) / "particles_reverted.star", a.root, log)
