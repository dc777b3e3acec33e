"""Heterogeneous synthetic data with ground truth.

Phantoms are built from Gaussian "atoms" grouped in domains: class 1 is the base
structure; each further class moves one domain (a hinge rotation, a domain
motion) or, with ``heterogeneity='removal'``, leaves one domain out. Particles
get uniform random poses, random origins, per-particle CTF and Gaussian noise at
a chosen SNR (variance of the noise-free CTF-modulated images over the noise
variance, inside the particle's circle). Written: MRC stacks, a RELION 3.1 STAR
file, the truth (STAR with true poses and classes, class maps, JSON summary).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .ctf import CTFParams, ctf_values
from .masks import spherical_mask
from .mrc import write_stack, write_volume
from .projection import frequency_mask, project_images
from .fourier import half_plane_coords
from .poses import rotvec_to_matrix
from .rotations import matrix_to_euler, random_rotations
from .starfile import new_particle_table, write_particles


@dataclass
class Phantom:
    """Atom centres (A, 3) in pixels from the box centre, radii (A,) in pixels, domain label per atom (A,)."""
    centres: np.ndarray
    radii: np.ndarray
    domain: np.ndarray


def make_phantom(box: int, rng: np.random.Generator, n_domains: int = 3, atoms_per_domain: int = 12,
                 extent: float = 0.28) -> Phantom:
    """A compact multi-domain particle filling about ``2 * extent`` of the box."""
    r_max = extent * box
    domain_centres = []
    while len(domain_centres) < n_domains:
        c = rng.uniform(-0.55, 0.55, 3) * r_max
        if all(np.linalg.norm(c - d) > 0.45 * r_max for d in domain_centres):
            domain_centres.append(c)
    centres, radii, dom = [], [], []
    for j, c in enumerate(domain_centres):
        pts = c + rng.normal(0, 0.22 * r_max, (atoms_per_domain, 3))
        centres.append(pts)
        radii.append(rng.uniform(0.035, 0.06, atoms_per_domain) * box)
        dom.append(np.full(atoms_per_domain, j))
    return Phantom(np.concatenate(centres), np.concatenate(radii), np.concatenate(dom))


def move_domain(ph: Phantom, domain: int, angle_deg: float, rng: np.random.Generator) -> Phantom:
    """Rotate one domain by ``angle_deg`` about a hinge at the contact with the rest (a domain closure)."""
    sel = ph.domain == domain
    hinge = 0.5 * (ph.centres[sel].mean(0) + ph.centres[~sel].mean(0))
    lever = ph.centres[sel].mean(0) - hinge
    axis = np.cross(lever, rng.normal(size=3))
    axis /= np.linalg.norm(axis)
    rot = rotvec_to_matrix(axis[None] * math.radians(angle_deg))[0]
    centres = ph.centres.copy()
    centres[sel] = (centres[sel] - hinge) @ rot.T + hinge
    return Phantom(centres, ph.radii.copy(), ph.domain.copy())


def render(ph: Phantom, box: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Density (D, D, D) float32 of the phantom's atoms (``keep`` selects atoms)."""
    ax = np.arange(box, dtype=np.float32) - box // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((box,) * 3, np.float32)
    sel = np.ones(len(ph.radii), bool) if keep is None else keep
    for (cx, cy, cz), r in zip(ph.centres[sel], ph.radii[sel]):
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2.0 * r * r))
    return vol


def make_class_volumes(box: int, n_classes: int, seed: int, heterogeneity: str = "motion",
                       motion_deg: float = 35.0) -> np.ndarray:
    """K ground-truth maps (K, D, D, D): a base structure and K-1 variants (domain motion or removal)."""
    rng = np.random.default_rng(seed)
    base = make_phantom(box, rng)
    vols = [render(base, box)]
    n_dom = int(base.domain.max()) + 1
    for j in range(1, n_classes):
        d = (j - 1) % n_dom
        if heterogeneity == "removal":
            vols.append(render(base, box, keep=base.domain != d))
        elif heterogeneity == "motion":
            angle = motion_deg * (1 + (j - 1) // n_dom)
            vols.append(render(move_domain(base, d, angle, rng), box))
        else:
            raise ValueError(f"unknown heterogeneity '{heterogeneity}': use 'motion' or 'removal'")
    vols = np.stack(vols)
    return (vols / vols[0].max()).astype(np.float32)


def random_ctf(n: int, rng: np.random.Generator, defocus_range_um=(1.0, 2.5), voltage_kV: float = 300.0,
               cs_mm: float = 2.7, amplitude_contrast: float = 0.1) -> CTFParams:
    """Per-particle CTFs with defocus uniform in the range and up to 5% astigmatism."""
    mean = rng.uniform(*defocus_range_um, n) * 1e4
    astig = rng.uniform(0, 0.05, n) * mean
    full = lambda v: np.full(n, float(v))
    return CTFParams(mean + astig / 2, mean - astig / 2, rng.uniform(-180, 180, n), full(voltage_kV), full(cs_mm),
                     full(amplitude_contrast), full(0), full(0), full(1))


def simulate(out_dir: str | Path, n_particles: int = 1000, n_classes: int = 2, box: int = 64,
             pixel_size_A: float = 2.0, snr: float = 0.1, seed: int = 0, heterogeneity: str = "motion",
             class_fractions: list[float] | None = None, volumes: np.ndarray | None = None,
             max_origin_A: float | None = None, ctf: bool = True, with_alignment: bool = True,
             stack_size: int = 1000, log=print) -> dict:
    """Simulate a data set into ``out_dir``; returns the summary written to ``truth.json``."""
    if box % 2:
        raise ValueError(f"box {box} is odd: use an even box")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vols = make_class_volumes(box, n_classes, seed, heterogeneity) if volumes is None else np.asarray(volumes, np.float32)
    k = len(vols)
    frac = np.full(k, 1.0 / k) if class_fractions is None else np.asarray(class_fractions, float)
    if len(frac) != k or np.any(frac < 0):
        raise ValueError(f"class_fractions must have {k} non-negative entries")
    labels = rng.choice(k, size=n_particles, p=frac / frac.sum())
    rots = random_rotations(n_particles, rng)
    max_origin_px = (0.05 * box) if max_origin_A is None else max_origin_A / pixel_size_A
    origins_px = rng.uniform(-max_origin_px, max_origin_px, (n_particles, 2))
    ctfp = random_ctf(n_particles, rng)
    sel = torch.as_tensor(frequency_mask(box))
    kk = torch.as_tensor(half_plane_coords(box))[sel]
    disc = torch.as_tensor(spherical_mask(box, 0.35 * box, 0, ndim=2) > 0.5)

    clean = np.zeros((n_particles, box, box), np.float32)
    batch = 256
    for j in range(k):
        vol = torch.as_tensor(vols[j], dtype=torch.float64)
        idx = np.flatnonzero(labels == j)
        for b in range(0, len(idx), batch):
            rows = idx[b:b + batch]
            c = ctf_values(ctfp, kk[:, 0], kk[:, 1], box, pixel_size_A, rows) if ctf else None
            img = project_images(vol, torch.as_tensor(rots[rows]), torch.as_tensor(origins_px[rows]), ctf=c)
            clean[rows] = img.numpy()
        log(f"simulate: projected class {j + 1} ({len(idx)} particles)")
    signal_var = float(clean[:, disc.numpy()].var())
    sigma = math.sqrt(signal_var / snr)
    noisy = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32)

    paths, index = [], []
    for s, start in enumerate(range(0, n_particles, stack_size)):
        name = out / f"particles_{s + 1:03d}.mrcs"
        part = noisy[start:start + stack_size]
        write_stack(name, part, pixel_size_A)
        paths += [str(name.resolve())] * len(part)
        index += list(range(1, len(part) + 1))
    rot, tilt, psi = matrix_to_euler(rots)
    common = dict(image_path=np.array(paths, dtype=object), image_index=np.array(index), pixel_size_A=pixel_size_A,
                  image_size=box)
    if ctf:
        common.update(defocus_u_A=ctfp.defocus_u_A, defocus_v_A=ctfp.defocus_v_A,
                      defocus_angle_deg=ctfp.defocus_angle_deg, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    truth_pose = dict(rot_deg=rot, tilt_deg=tilt, psi_deg=psi, shift_x_A=origins_px[:, 0] * pixel_size_A,
                      shift_y_A=origins_px[:, 1] * pixel_size_A)
    truth_table = new_particle_table(**common, **truth_pose, class_number=labels + 1)
    write_particles(out / "truth_particles.star", truth_table)
    table = new_particle_table(**common, **(truth_pose if with_alignment else {}))
    write_particles(out / "particles.star", table)
    for j in range(k):
        write_volume(out / f"truth_class_{j + 1:03d}.mrc", vols[j], pixel_size_A)
    write_volume(out / "consensus.mrc", np.tensordot(np.bincount(labels, minlength=k) / n_particles, vols, 1),
                 pixel_size_A)
    summary = dict(n_particles=n_particles, n_classes=k, box=box, pixel_size_A=pixel_size_A, snr=snr, seed=seed,
                   noise_sigma=sigma, heterogeneity=heterogeneity, ctf=ctf, with_alignment=with_alignment,
                   class_sizes=np.bincount(labels, minlength=k).tolist(),
                   particles_star="particles.star", truth_star="truth_particles.star",
                   truth_maps=[f"truth_class_{j + 1:03d}.mrc" for j in range(k)], consensus_map="consensus.mrc")
    (out / "truth.json").write_text(json.dumps(summary, indent=2))
    log(f"simulate: wrote {n_particles} particles of {box}px at {pixel_size_A} A/px, SNR {snr}, "
        f"{k} classes {summary['class_sizes']} to {out}")
    return summary
