"""CTF-weighted Fourier reconstruction from images at known poses.

An image X with CTF c at rotation A contributes c * X to the data grid and c^2 to
the weight grid (the trilinear adjoint of :func:`~hetplugin.core.projection.project_ft`);
the map is then
F = data / (weight + reg), with a per-shell Wiener term reg = <weight>_shell /
(T * SNR_shell) when a spectral SNR is known (from a half-set FSC), else a small
floor. Images are given as half-plane transforms on the frequencies selected by
:func:`hetplugin.core.projection.frequency_mask`, already centred (origin undone).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .fourier import SLAB_ELEMENTS, centred_dft_axis, half_plane_coords
from .fsc import fsc, fsc_to_snr
from .projection import frequency_mask, undo_gridding

INSERT_CHUNK_POINTS = 1 << 16


class Backprojector:
    """Accumulates data and weight grids for one volume of box ``box`` (padded by ``pad``).

    The grids hold the half space x >= 0 (P, P, P/2+1), z and y centred at P/2, x from 0: the
    map is real, so its transform is Hermitian and a sample at q with x < 0 goes in as its
    conjugate at -q (as RELION's backprojector does). That halves the largest arrays of a
    refinement, and the map comes back with a real inverse transform.
    """

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
        self.shape = (self.size, self.size, self.size // 2 + 1)
        r_max = grid_box / 2 - 1 if r_max is None else min(r_max, grid_box / 2 - 1)
        sel = frequency_mask(box, r_max)
        self.select = torch.as_tensor(sel, device=self.device)
        k = half_plane_coords(box)[sel]
        self.coords = torch.as_tensor(k, dtype=dtype, device=self.device)
        # rows: real part, imaginary part and weight, flattened; three real index_add_ calls are
        # ~2.5x faster on CPU than one complex index_add_ plus one real
        self.acc = torch.zeros((3, math.prod(self.shape)), dtype=dtype, device=self.device)

    @property
    def data(self) -> torch.Tensor:
        """(P, P, P/2+1) complex data grid, half space x >= 0 (a new tensor)."""
        return torch.complex(self.acc[0], self.acc[1]).view(self.shape)

    @property
    def weight(self) -> torch.Tensor:
        """(P, P, P/2+1) real weight grid, half space x >= 0 (a view)."""
        return self.acc[2].view(self.shape)

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
        rot = rotations.to(device=self.device, dtype=self.dtype).to(dtype=coords.dtype)
        # images go in chunks of ~2^16 points on the CPU (256x on a GPU): the corner indices,
        # weights and weighted values take ~200 bytes a point, and the allocator keeps what the
        # largest chunk once needed
        chunk = INSERT_CHUNK_POINTS if self.device.type == "cpu" else 256 * INSERT_CHUNK_POINTS
        step = max(1, chunk // max(coords.shape[0], 1))
        for start in range(0, rot.shape[0], step):
            # the same interpolation corners serve the data and the weight grids
            idx, cw, sign = _half_corners(rot[start:start + step], coords, self.pad, self.size)
            cw = cw.to(self.dtype)
            imag = vals.imag[start:start + step].reshape(-1) * sign.to(vals.real.dtype)
            for row, v in zip(self.acc, (vals.real[start:start + step].reshape(-1), imag,
                                         wts[start:start + step].reshape(-1))):
                row.index_add_(0, idx, (v.to(self.dtype)[None] * cw).reshape(-1))

    def add(self, other: "Backprojector") -> None:
        """Sum another accumulator into this one (e.g. per-batch or per-rank partial sums)."""
        self.acc += other.acc

    def grids(self, symmetry: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hermitian-completed half-space (data, weight) grids (P, P, P/2+1), summed over the
        symmetry operators (G, 3, 3) if given."""
        data, weight = self.data, self.weight.clone()
        # on the plane x = 0 both q and -q are held: G(q) + conj(G(-q)) completes it
        for grid in (data, weight):
            plane = grid[..., 0].clone()
            mirror = _mirror_zy(plane)
            grid[..., 0] = plane + (mirror.conj() if grid.is_complex() else mirror)
        if symmetry is not None and len(symmetry) > 1:
            full_d, full_w = symmetrize_grids(_full_grid(data), _full_grid(weight), symmetry)
            data, weight = _half_grid(full_d), _half_grid(full_w)
        return data, weight

    def reconstruct(self, snr_per_shell: np.ndarray | None = None, tau2_fudge: float = 1.0,
                    symmetry: np.ndarray | None = None, floor_fraction: float = 1e-3) -> torch.Tensor:
        """Real (D, D, D) map. ``snr_per_shell`` (D//2+1,) gives the Wiener term; without it a small floor."""
        data, weight = self.grids(symmetry)  # fresh tensors: modified in place below
        size, n_x = self.size, self.shape[2]
        n_shells = self.box // 2 + 1
        # per-voxel quantities depend only on the squared radius r2 = x^2 + y^2 + z^2 (integer):
        # small look-up tables replace the radius grid; the grids go through in z-slabs. On the
        # plane x = 0 the half space holds q and -q: each counts once in the shell means
        shell_of, inside_of, z2, yx2, once_x = _shell_tables(size, self.pad, n_shells, self.grid_box / 2 - 1 + 1e-6,
                                                          str(self.device), self.dtype)
        step = max(1, SLAB_ELEMENTS // (size * n_x))
        slabs = [(z0, min(size, z0 + step)) for z0 in range(0, size, step)]

        def r2_of(z0, z1):
            return (z2[z0:z1, None, None] + yx2[None]).reshape(-1)

        sums = torch.zeros(n_shells, dtype=self.dtype, device=self.device)
        counts = torch.zeros(n_shells, dtype=self.dtype, device=self.device)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        for z0, z1 in slabs:
            s = shell_of[r2_of(z0, z1)]
            w = weight[z0:z1].reshape(-1)
            count = torch.where(w > 0, once_x.expand(z1 - z0, size, n_x).reshape(-1), zero)
            sums.index_add_(0, s, w * count)
            counts.index_add_(0, s, count)
        mean_w = sums / counts.clamp(min=1)
        reg = floor_fraction * mean_w
        if snr_per_shell is not None:
            snr = torch.as_tensor(np.asarray(snr_per_shell), dtype=self.dtype, device=self.device)[:n_shells]
            reg = torch.maximum(reg, mean_w / (tau2_fudge * snr.clamp(min=1e-6)))
        reg_of = reg[shell_of]
        inf = torch.tensor(float("inf"), dtype=self.dtype, device=self.device)
        for z0, z1 in slabs:
            r2 = r2_of(z0, z1)
            w = weight[z0:z1].reshape(-1)
            # zero where there is no weight or beyond the limit: x / inf = 0
            denom = torch.where((w > 0) & inside_of[r2], w + reg_of[r2], inf)
            d = torch.view_as_real(data[z0:z1]).view(-1, 2)
            d.div_(denom[:, None])  # complex / real, component-wise
        return _half_grid_to_map(data, self.box, self.pad)


def _half_corners(rotations: torch.Tensor, coords: torch.Tensor, pad: int, size: int):
    """Trilinear corners of rotated frequencies in a half-space (P, P, P/2+1) grid: flattened
    indices (8 * R * M,) (int32 where the grid allows: a third less index traffic in index_add_),
    weights (8, R * M) (zero outside) and each point's sign (R * M,): -1 where x < 0, whose sample
    goes in at -q with its value conjugated."""
    n_x = size // 2 + 1
    pos = torch.matmul(coords * pad, rotations[:, :2, :]).reshape(-1, 3)
    sign = torch.where(pos[:, 0] < 0, -1.0, 1.0).to(pos.dtype)
    pos.mul_(sign[:, None]).add_(pos.new_tensor([0.0, size // 2, size // 2]))
    base = torch.floor(pos)
    frac = pos.sub_(base)
    high = pos.new_tensor([n_x - 2, size - 2, size - 2])
    inside = ((base >= 0) & (base <= high)).all(dim=1)
    index_dtype = torch.int32 if size * size * n_x < 2 ** 31 else torch.int64
    base = torch.minimum(base.clamp_(min=0), high).to(index_dtype)
    lin = (base[:, 2] * size + base[:, 1]) * n_x + base[:, 0]
    steps = torch.tensor([0, 1], dtype=index_dtype, device=pos.device)
    offsets = ((steps[:, None, None] * size + steps[None, :, None]) * n_x + steps[None, None, :]).reshape(8)
    idx = (lin[None, :] + offsets[:, None]).reshape(-1)
    # points outside the grid get zero weight through their x factors
    fx = torch.stack([1 - frac[:, 0], frac[:, 0]]) * inside
    fy, fz = (torch.stack([1 - frac[:, a], frac[:, a]]) for a in (1, 2))
    w = (fz[:, None, None] * fy[None, :, None] * fx[None, None, :]).reshape(8, -1)
    return idx, w, sign


def _full_grid(half: torch.Tensor) -> torch.Tensor:
    """(P, P, P) centred grid from its Hermitian half space (P, P, P/2+1) (x = -P/2 left at 0)."""
    size = half.shape[0]
    full = half.new_zeros((size, size, size))
    full[..., size // 2:] = half[..., :size // 2]
    mirror = _mirror_zy(torch.flip(half[..., 1:size // 2], (2,)))  # x < 0 from -q
    full[..., 1:size // 2] = mirror.conj() if half.is_complex() else mirror
    return full


def _mirror_zy(grid: torch.Tensor) -> torch.Tensor:
    """``grid`` at -z, -y on centred axes 0 and 1: index i -> (P - i) mod P."""
    return torch.roll(torch.flip(grid, (0, 1)), (1, 1), (0, 1))


def _half_grid(full: torch.Tensor) -> torch.Tensor:
    """The half space x >= 0 (P, P, P/2+1) of a centred (P, P, P) grid (x = P/2 set to 0)."""
    size = full.shape[0]
    half = full.new_zeros((size, size, size // 2 + 1))
    half[..., :size // 2] = full[..., size // 2:]
    return half


def _half_grid_to_map(data: torch.Tensor, box: int, pad: int) -> torch.Tensor:
    """Real (D, D, D) map from a Hermitian half-space transform (S, S, S/2+1) (z, y centred, x from
    0) of the padded map (box N = pad * D; S <= N when the grid was cropped), undoing the gridding
    correction.

    z and y go back with centred inverse DFTs of length N that keep only the central D samples,
    then x with a real inverse FFT of length N (as irfftn would): no (N, N, N) array is made.
    """
    n = pad * box
    vol = centred_dft_axis(data, -3, n, box, inverse=True)
    vol = centred_dft_axis(vol, -2, n, box, inverse=True)
    at = (torch.arange(box, device=data.device) - box // 2) % n
    real = torch.empty((box, box, box), dtype=vol.real.dtype, device=data.device)
    step = max(1, SLAB_ELEMENTS // (box * n))
    for z0 in range(0, box, step):
        real[z0:z0 + step] = torch.fft.irfft(vol[z0:z0 + step], n=n, dim=-1).index_select(-1, at)
    return undo_gridding(real, pad, inplace=True)


@lru_cache(maxsize=8)
def _shell_tables(size: int, pad: int, n_shells: int, limit: float, device: str, dtype: torch.dtype):
    """Look-up tables over r2 = x^2 + y^2 + z^2 of a half-space (P, P, P/2+1) grid (z, y centred,
    x from 0): the shell index round(sqrt(r2) / pad) (clamped to n_shells - 1) and whether
    sqrt(r2) / pad <= limit; z^2 (P,) and y^2 + x^2 (P, P/2+1) as int64; and the count (P/2+1,)
    a voxel carries in shell means, by x (1/2 on the plane x = 0, which holds both q and -q)."""
    dev = torch.device(device)
    half = size // 2
    r = torch.as_tensor(np.sqrt(np.arange(3 * half * half + 1, dtype=np.float64)) / pad, dtype=dtype, device=dev)
    shell_of = torch.round(r).long().clamp_(max=n_shells - 1)
    ax2 = (torch.arange(size, device=dev) - half) ** 2
    x2 = torch.arange(half + 1, device=dev) ** 2
    once_x = torch.ones(half + 1, dtype=dtype, device=dev)
    once_x[0] = 0.5
    return shell_of, r <= limit, ax2, ax2[:, None] + x2[None, :], once_x


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


def gold_standard_map(dataset, halves: np.ndarray, rows: np.ndarray | None = None, fsc_mask: np.ndarray | None = None,
                      tau2_fudge: float = 1.0, symmetry: np.ndarray | None = None, batch_size: int = 256,
                      log=None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Half-set reconstructions of ``rows`` (default all) of a dataset at its own poses, to Nyquist.

    ``halves`` (N,) labels every particle 1 or 2. Returns the map from both halves, Wiener-filtered
    with the SNR of the half maps' FSC (within ``fsc_mask``) and fudge T, the two unfiltered half
    maps, and the FSC curve (D/2 + 1,)."""
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    bps = []
    for h in (1, 2):
        part = rows[halves[rows] == h]
        if log is not None:
            log(f"reconstruct: half set {h} ({len(part)} particles)")
        bps.append(backproject_dataset(dataset, part, batch_size, log=log))
    half_maps = [bp.reconstruct(symmetry=symmetry).cpu().numpy() for bp in bps]
    curve = fsc(half_maps[0], half_maps[1], fsc_mask)
    bps[0].add(bps[1])
    full = bps[0].reconstruct(fsc_to_snr(curve), tau2_fudge, symmetry).cpu().numpy()
    return full, half_maps, curve
