"""Centred Fourier transforms, padding and cropping, radial shells and filters.

Real-space arrays are (z, y, x) or (y, x) with the origin at index D // 2 on each
axis (RELION's convention). Frequencies are in cycles per box ("index units"):
an image frequency k corresponds to k / (D * pixel_size_A) 1/A.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# elements per slab where whole grids go through in slabs: each slab's temporaries (a complex
# transform and its index and phase products, or int64 radius tables) stay at a few MB, which the
# allocator keeps for reuse however large the grid
SLAB_ELEMENTS = 1 << 20


def fftn_centered(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Complex transform of ``x`` over ``dims`` with both origins at the array centre."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifftn_centered(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`fftn_centered` (complex result)."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def centred_dft_axis(x: torch.Tensor, dim: int, n: int, out_len: int, inverse: bool = False) -> torch.Tensor:
    """Centred DFT of length ``n`` along ``dim``, input zero-padded to ``n`` and output cropped to
    ``out_len``, without making the padded array: the forward transform of a real-space axis
    (origin at len // 2) gives frequencies -out_len//2 .. out_len - out_len//2 - 1 (in 1/n units);
    the inverse (scaled 1/n) takes centred frequencies to the central ``out_len`` samples.

    With c = len // 2 the input's origin and b the centred output index, the sum is
    exp(+-2 pi i c b / n) times the plain (inverse) FFT of the input padded at its end, at b mod n.
    Slabs of an axis that is not transformed keep the length-n temporaries small.
    """
    dim = dim % x.dim()
    real = x.real.dtype if x.is_complex() else x.dtype
    cdtype = torch.complex64 if real == torch.float32 else torch.complex128
    b = torch.arange(out_len, device=x.device) - out_len // 2
    sign = -1.0 if inverse else 1.0
    phase = torch.polar(torch.ones(out_len, dtype=torch.float64, device=x.device),
                        (sign * 2.0 * math.pi * (x.shape[dim] // 2) / n) * b.to(torch.float64)).to(cdtype)
    phase = phase.reshape([out_len if d == dim else 1 for d in range(x.dim())])
    index = b % n
    transform = torch.fft.ifft if inverse else torch.fft.fft
    other = max((d for d in range(x.dim()) if d != dim), key=lambda d: x.shape[d])
    out = torch.empty([out_len if d == dim else x.shape[d] for d in range(x.dim())], dtype=cdtype, device=x.device)
    count = x.shape[other]
    step = max(1, SLAB_ELEMENTS // max(x.numel() // count * n // x.shape[dim], 1))
    for start in range(0, count, step):
        part = x.narrow(other, start, min(step, count - start))
        out.narrow(other, start, part.shape[other]).copy_(transform(part, n=n, dim=dim).index_select(dim, index)
                                                          * phase)
    return out


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """Real images (..., D, D) -> half-plane transforms (..., D, D//2+1), ky centred at row D//2, kx = column."""
    return torch.fft.fftshift(torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))), dim=-2)


def irfft2_centered(images_ft: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered` for a box of ``box`` pixels."""
    x = torch.fft.irfft2(torch.fft.ifftshift(images_ft, dim=-2), s=(box, box))
    return torch.fft.fftshift(x, dim=(-2, -1))


def half_plane_coords(box: int) -> np.ndarray:
    """(ky, kx) index frequencies of the :func:`rfft2_centered` layout, shape (D, D//2+1, 2) as (kx, ky)."""
    ky = np.arange(box) - box // 2
    kx = np.arange(box // 2 + 1)
    gx, gy = np.meshgrid(kx, ky)
    return np.stack([gx, gy], axis=-1).astype(np.float64)


def half_plane_hermitian_weights(box: int) -> np.ndarray:
    """Weights (D, D//2+1) so that a sum over the half plane equals the sum over the full plane.

    Columns kx = 0 and (for even D) kx = D/2 hold each frequency once (their
    conjugates are in the same column); every other column stands for two.
    """
    w = np.full((box, box // 2 + 1), 2.0)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    return w


def radius(shape: tuple[int, ...]) -> np.ndarray:
    """Euclidean radius in pixels from the centre (index D // 2) of an array of ``shape``.

    Built from per-axis squares by broadcasting: the result is the only full-size array."""
    r2 = np.zeros((1,) * len(shape))
    for axis, n in enumerate(shape):
        r2 = r2 + ((np.arange(n, dtype=np.float64) - n // 2) ** 2).reshape(
            [n if a == axis else 1 for a in range(len(shape))])
    return np.sqrt(r2, out=r2)


def half_space_radius(box: int, dtype: torch.dtype = torch.float64, device=None,
                      z: slice = slice(None)) -> torch.Tensor:
    """|k| (index units) on the grid of ``torch.fft.rfftn`` of a (D, D, D) cube: (D, D, D//2+1), z and y
    in FFT order (0, 1, .., -1), x from 0; only the z-planes ``z`` when given (a slab)."""
    f = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=device)
    x = torch.arange(box // 2 + 1, dtype=torch.float64, device=device)
    r2 = f[z, None, None] ** 2 + f[None, :, None] ** 2 + x[None, None, :] ** 2
    return r2.sqrt_().to(dtype)


def shell_average(values: np.ndarray, shells: np.ndarray, n_shells: int, weights=None) -> np.ndarray:
    """Mean of ``values`` in each integer shell 0..n_shells-1 (0 where a shell is empty)."""
    shells = shells.ravel()
    keep = shells < n_shells
    w = np.ones(shells.shape) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    num = np.bincount(shells[keep], weights=(np.asarray(values, dtype=np.float64).ravel() * w)[keep],
                      minlength=n_shells)
    den = np.bincount(shells[keep], weights=w[keep], minlength=n_shells)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)


def lowpass_volume(volume: torch.Tensor, resolution_A: float, pixel_size_A: float,
                   edge_width_shells: float = 2.0) -> torch.Tensor:
    """Low-pass a real cube to ``resolution_A`` with a raised-cosine edge of ``edge_width_shells``."""
    box = volume.shape[-1]
    if resolution_A <= 2 * pixel_size_A:
        return volume.clone()
    k_cut = box * pixel_size_A / resolution_A
    filt = raised_cosine(half_space_radius(box, volume.dtype, volume.device), k_cut, edge_width_shells)
    ft = torch.fft.rfftn(volume, dim=(-3, -2, -1)) * filt
    return torch.fft.irfftn(ft, s=(box,) * 3, dim=(-3, -2, -1)).to(volume.dtype)


def raised_cosine(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """1 below ``cutoff - width/2``, 0 above ``cutoff + width/2``, a cosine in between."""
    lo = cutoff - width / 2.0
    t = torch.clamp((r - lo) / max(width, 1e-6), 0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def shift_phase(kx: torch.Tensor, ky: torch.Tensor, shift_x_px: torch.Tensor, shift_y_px: torch.Tensor,
                box: int) -> torch.Tensor:
    """Phase factors (n, M) that translate images by (+shift_x, +shift_y) pixels.

    kx, ky: (M,) index frequencies; shifts: (n,) pixels. Multiplying a centred
    transform by exp(-2 pi i k.s / D) moves the image content by +s.
    """
    arg = -2.0 * math.pi / box * (shift_x_px[:, None] * kx[None, :] + shift_y_px[:, None] * ky[None, :])
    return torch.polar(torch.ones_like(arg), arg)


def recentre_volume(volume, centre_px, new_box: int | None = None) -> np.ndarray:
    """``volume`` (D, D, D) moved by -centre (x, y, z pixels from the box centre D // 2, so that that
    point lands at the box centre) by a Fourier phase shift, then windowed to the central
    ``new_box`` cube (default D): the map in the frame of particles recentred on that point (as
    :mod:`hetplugin.core.subtract` recentres them). float64 inside, float32 out."""
    vol = torch.as_tensor(np.asarray(volume), dtype=torch.float64)
    box = vol.shape[-1]
    new_box = box if new_box is None else int(new_box)
    if new_box > box:
        raise ValueError(f"the new box {new_box} is larger than the volume's {box}")
    k = torch.arange(box, dtype=torch.float64) - box // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    cx, cy, cz = (float(c) for c in centre_px)
    phase = torch.exp(2j * math.pi * (kx * cx + ky * cy + kz * cz) / box)
    moved = ifftn_centered(fftn_centered(vol, (-3, -2, -1)) * phase, (-3, -2, -1)).real
    start = box // 2 - new_box // 2
    window = moved[start:start + new_box, start:start + new_box, start:start + new_box]
    return window.numpy().astype(np.float32)
