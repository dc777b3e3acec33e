"""Map comparisons shared by the subtraction tests (core and Scipion)."""
import numpy as np
import torch

from hetplugin.core.fourier import crop_volume, fftn_centered, ifftn_centered, radius


def shifted_truth(volume, centre_px, new_box: int) -> torch.Tensor:
    """The map moved by -centre (so that the centre lands at the box centre), windowed to new_box."""
    box = volume.shape[-1]
    k = torch.arange(box, dtype=torch.float64) - box // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    phase = torch.exp(2j * np.pi * (kx * centre_px[0] + ky * centre_px[1] + kz * centre_px[2]) / box)
    moved = ifftn_centered(fftn_centered(torch.as_tensor(volume, dtype=torch.float64), (-3, -2, -1)) * phase,
                           (-3, -2, -1)).real
    return crop_volume(moved, new_box)


def lowpass_sharp(volume, r_max: float) -> np.ndarray:
    """Frequencies beyond ``r_max`` (index units) set to zero."""
    ft = fftn_centered(torch.as_tensor(volume).to(torch.float64), (-3, -2, -1))
    ft = ft * torch.as_tensor(radius(tuple(volume.shape)) <= r_max)
    return ifftn_centered(ft, (-3, -2, -1)).real.numpy()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
