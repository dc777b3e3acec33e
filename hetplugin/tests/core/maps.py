"""Reference helpers shared by the tests (core and Scipion): map comparisons, and the plain
full-grid adjoint of the projector that the engine's half-space backprojector is checked against."""
import numpy as np
import torch

from hetplugin.core.fourier import fftn_centered, ifftn_centered, radius


def crop_volume(volume: torch.Tensor, box: int) -> torch.Tensor:
    """Central (D, D, D) cube of a (P, P, P) volume (centre P // 2 kept at D // 2)."""
    start = volume.shape[-1] // 2 - box // 2
    return volume[..., start:start + box, start:start + box, start:start + box]


def backproject_ft(values: torch.Tensor, rotations: torch.Tensor, coords: torch.Tensor, size: int,
                   pad: int = 2) -> torch.Tensor:
    """Adjoint of ``project_ft`` on a full centred (P, P, P) grid: (R, M) values (complex, or real
    such as CTF^2 weights) at frequencies ``coords`` (M, 2) of slices at ``rotations`` (R, 3, 3),
    scattered to their eight trilinear corners (zero weight outside the grid)."""
    rot = rotations.to(device=values.device, dtype=coords.dtype)
    pos = (torch.einsum("mi,rij->rmj", coords, rot[:, :2, :]) * pad + size // 2).reshape(-1, 3)
    base = torch.floor(pos)
    frac = pos - base
    inside = ((base >= 0) & (base <= size - 2)).all(dim=1)
    base = base.long().clamp_(0, size - 2)
    out = torch.zeros((size,) * 3, dtype=values.dtype, device=values.device)
    flat, vals = out.view(-1), values.reshape(-1)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = ((frac[:, 2] if dz else 1 - frac[:, 2]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                     * (frac[:, 0] if dx else 1 - frac[:, 0]) * inside)
                lin = ((base[:, 2] + dz) * size + base[:, 1] + dy) * size + base[:, 0] + dx
                flat.index_add_(0, lin, vals * w.to(vals.real.dtype))
    return out


def lowpass_sharp(volume, r_max: float) -> np.ndarray:
    """Frequencies beyond ``r_max`` (index units) set to zero."""
    ft = fftn_centered(torch.as_tensor(volume).to(torch.float64), (-3, -2, -1))
    ft = ft * torch.as_tensor(radius(tuple(volume.shape)) <= r_max)
    return ifftn_centered(ft, (-3, -2, -1)).real.numpy()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
