"""Contrast transfer function, in RELION's convention.

CTF(s) = scale * exp(-B |s|^2 / 4) * sin(gamma(s)), with
gamma = pi * lambda * dz(theta) * |s|^2 - (pi / 2) * Cs * lambda^3 * |s|^4 + phase_shift + atan(Q / sqrt(1 - Q^2)),
dz(theta) = (U + V) / 2 + (U - V) / 2 * cos(2 (theta - defocus_angle)),
theta = atan2(s_y, s_x); positive defocus is underfocus; s in 1/A.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def electron_wavelength_A(voltage_kV: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass
class CTFParams:
    """Per-image CTF parameters, each an (n,) float64 array."""
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray

    def subset(self, rows) -> "CTFParams":
        return CTFParams(**{k: np.asarray(v)[rows] for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    @classmethod
    def from_table(cls, table) -> "CTFParams":
        """CTF arrays of a :class:`hetplugin.core.starfile.ParticleTable` (must have CTF)."""
        if not table.has_ctf:
            raise ValueError(f"{table.star_path}: the particles carry no CTF (no rlnDefocusU column); "
                             "estimate the CTF first or run without CTF correction")
        n = len(table)

        def arr(v, default):
            return np.full(n, default, dtype=np.float64) if v is None else np.asarray(v, dtype=np.float64)
        return cls(arr(table.defocus_u_A, 0), arr(table.defocus_v_A, 0), arr(table.defocus_angle_deg, 0),
                   arr(table.voltage_kV, 300), arr(table.cs_mm, 2.7), arr(table.amplitude_contrast, 0.1),
                   arr(table.phase_shift_deg, 0), arr(table.ctf_bfactor_A2, 0), arr(table.ctf_scale, 1))


def ctf_values(params: CTFParams, kx: torch.Tensor, ky: torch.Tensor, box: int, pixel_size_A: float,
               rows=None, intact_first_peak: bool = False) -> torch.Tensor:
    """CTF of images ``rows`` (default all) at index frequencies kx, ky (M,), shape (n, M).

    ``intact_first_peak`` sets the CTF to 1 (times the envelope) below its first
    peak, like RELION's --ctf_intact_first_peak.
    """
    p = params if rows is None else params.subset(rows)
    dev, dt = kx.device, kx.dtype

    if dt == torch.float32:
        return _ctf_values_float32(p, kx, ky, box, pixel_size_A, intact_first_peak)

    def col(v):
        return torch.as_tensor(np.asarray(v, dtype=np.float64), device=dev, dtype=torch.float64)[:, None]

    sx = kx.to(torch.float64)[None, :] / (box * pixel_size_A)
    sy = ky.to(torch.float64)[None, :] / (box * pixel_size_A)
    s2 = sx * sx + sy * sy
    theta = torch.atan2(sy, sx)
    lam = col(electron_wavelength_A(p.voltage_kV))
    u, v, ang = col(p.defocus_u_A), col(p.defocus_v_A), col(np.deg2rad(p.defocus_angle_deg))
    dz = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2.0 * (theta - ang))
    cs_A = col(p.cs_mm) * 1e7
    q = col(np.clip(p.amplitude_contrast, 0.0, 0.999))
    gamma = (math.pi * lam * dz * s2 - 0.5 * math.pi * cs_A * lam ** 3 * s2 * s2
             + col(np.deg2rad(p.phase_shift_deg)) + torch.atan(q / torch.sqrt(1.0 - q * q)))
    ctf = torch.sin(gamma)
    if intact_first_peak:
        ctf = torch.where(torch.abs(gamma) < 0.5 * math.pi, torch.ones_like(ctf), ctf)
    ctf = ctf * col(p.scale) * torch.exp(-col(p.bfactor_A2) * s2 / 4.0)
    return ctf.to(dt)


def _ctf_values_float32(p: CTFParams, kx: torch.Tensor, ky: torch.Tensor, box: int, pixel_size_A: float,
                        intact_first_peak: bool) -> torch.Tensor:
    """:func:`ctf_values` for float32 output, with the same float64 phase and fewer float64 transcendentals.

    gamma reaches ~1000 rad at high frequency and large defocus, so it stays float64 (float32
    would cost ~1e-4 rad); cos(2 (theta - angle)) is expanded over per-frequency cos 2theta, sin 2theta;
    gamma is reduced to [-pi, pi] in float64 before a float32 sine, and the envelope is float32.
    """
    dev, f64, f32 = kx.device, torch.float64, torch.float32

    def col(v):
        return torch.as_tensor(np.asarray(v, dtype=np.float64), device=dev, dtype=f64)[:, None]

    sx = kx.to(f64)[None, :] / (box * pixel_size_A)
    sy = ky.to(f64)[None, :] / (box * pixel_size_A)
    s2 = sx * sx + sy * sy
    theta2 = 2.0 * torch.atan2(sy, sx)
    lam = electron_wavelength_A(p.voltage_kV)
    u, v = np.asarray(p.defocus_u_A, dtype=np.float64), np.asarray(p.defocus_v_A, dtype=np.float64)
    ang2 = 2.0 * np.deg2rad(np.asarray(p.defocus_angle_deg, dtype=np.float64))
    q = np.clip(np.asarray(p.amplitude_contrast, dtype=np.float64), 0.0, 0.999)
    # gamma = pi lam s^2 ((u+v)/2 + (u-v)/2 cos(2 theta - 2 angle)) - pi/2 Cs lam^3 s^4 + phase
    half_diff = 0.5 * (u - v)
    bc, bs = col(half_diff * np.cos(ang2)), col(half_diff * np.sin(ang2))
    dz = (bc * torch.cos(theta2)).add_(bs * torch.sin(theta2)).add_(col(0.5 * (u + v)))
    gamma = dz.mul_(col(math.pi * lam) * s2)
    gamma.sub_(col(0.5 * math.pi * np.asarray(p.cs_mm, dtype=np.float64) * 1e7 * lam ** 3) * (s2 * s2))
    gamma.add_(col(np.deg2rad(p.phase_shift_deg) + np.arctan(q / np.sqrt(1.0 - q * q))))
    two_pi = 2.0 * math.pi
    reduced = gamma - torch.round(gamma / two_pi) * two_pi
    ctf = torch.sin(reduced.to(f32))
    if intact_first_peak:
        ctf = torch.where(torch.abs(gamma) < 0.5 * math.pi, torch.ones_like(ctf), ctf)
    env = torch.exp((col(-0.25 * np.asarray(p.bfactor_A2, dtype=np.float64)) * s2).to(f32))
    return ctf.mul_(env).mul_(col(p.scale).to(f32))
