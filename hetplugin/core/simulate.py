"""Heterogeneous synthetic data with ground truth.

Phantoms are built from Gaussian "atoms" grouped in domains: class 1 is the base
structure; each further class moves one domain (a hinge rotation, a domain
motion) or, with ``heterogeneity='removal'``, leaves one domain out. Particles
get uniform random poses, random origins, per-particle CTF and Gaussian noise at
a chosen SNR (variance of the noise-free CTF-modulated images over the whole
box, divided by the noise variance: the usual definition in simulation studies). Written: MRC stacks, a RELION 3.1 STAR
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
from .mrc import write_stack, write_volume
from .projection import frequency_mask, prepare_volume, project_images, slice_grid
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


def make_phantom(box: int, rng: np.random.Generator, n_domains: int = 4, atoms_per_domain: int = 60,
                 atom_spacing_px: float | None = None, atom_sigma_px: float | None = None) -> Phantom:
    """A compact pseudo-atomic particle of ``n_domains`` touching domains.

    Each domain is an ellipsoid of random orientation and proportions holding about
    ``atoms_per_domain`` Gaussian "residues" at least ``atom_spacing_px`` apart, so the
    particle has no pseudo-symmetry and its map carries high-resolution signal, like a
    protein. By default spacing (1.9 px) and width (0.9 px) are those of a box of 64 (3.8 A,
    a C-alpha spacing, at 2 A/px) scaled to ``box``: the same particle at any sampling.
    """
    scale = box / 64.0
    atom_spacing_px = 1.9 * scale if atom_spacing_px is None else atom_spacing_px
    atom_sigma_px = max(0.9 * scale, 0.6) if atom_sigma_px is None else atom_sigma_px
    counts = np.maximum(10, np.round(atoms_per_domain * rng.uniform(0.6, 1.4, n_domains))).astype(int)
    radii = (counts * 2.0 * atom_spacing_px ** 3 * 3.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    if 2.5 * radii.sum() > 0.9 * box * 2:
        raise ValueError(f"box {box} is too small for {counts.sum()} atoms; use a larger box")
    centres_d = [np.zeros(3)]
    while len(centres_d) < n_domains:
        j = len(centres_d)
        anchor = rng.integers(j)
        direction = rng.normal(size=3)
        c = centres_d[anchor] + direction / np.linalg.norm(direction) * 0.85 * (radii[anchor] + radii[j])
        if all(np.linalg.norm(c - d) >= 0.8 * (radii[i] + radii[j]) for i, d in enumerate(centres_d)):
            centres_d.append(c)
    shift = np.average(centres_d, axis=0, weights=counts)
    centres, dom = [], []
    for j, c in enumerate(centres_d):
        axes = rng.uniform(0.7, 1.4, 3)
        axes /= np.prod(axes) ** (1.0 / 3.0)
        orient = rotvec_to_matrix(rng.normal(size=(1, 3)))[0]
        pts: list[np.ndarray] = []
        tries = 0
        while len(pts) < counts[j] and tries < 200 * counts[j]:
            tries += 1
            u = rng.uniform(-1, 1, 3)
            if np.linalg.norm(u) > 1:
                continue
            p = orient @ (u * axes * radii[j]) + c - shift
            if all(np.linalg.norm(p - q) >= atom_spacing_px for q in pts):
                pts.append(p)
        centres.append(np.array(pts))
        dom.append(np.full(len(pts), j))
    centres_all = np.concatenate(centres)
    return Phantom(centres_all, np.full(len(centres_all), atom_sigma_px), np.concatenate(dom))


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
    half = box // 2
    for (cx, cy, cz), r in zip(ph.centres[sel], ph.radii[sel]):
        # each atom only touches a small window around it
        w = int(math.ceil(4 * r)) + 1
        lo = [max(0, int(round(c)) + half - w) for c in (cz, cy, cx)]
        hi = [min(box, int(round(c)) + half + w + 1) for c in (cz, cy, cx)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        vol[sl] += np.exp(-((x[sl] - cx) ** 2 + (y[sl] - cy) ** 2 + (z[sl] - cz) ** 2) / (2.0 * r * r))
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


def write_stacks(out: Path, images: np.ndarray, pixel_size_A: float, stack_size: int) -> tuple[list, list]:
    """Write images (N, D, D) as ``particles_NNN.mrcs`` stacks of ``stack_size``; returns each
    image's (absolute stack path, 1-based index)."""
    paths, index = [], []
    for s, start in enumerate(range(0, len(images), stack_size)):
        name = out / f"particles_{s + 1:03d}.mrcs"
        part = images[start:start + stack_size]
        write_stack(name, part, pixel_size_A)
        paths += [str(name.resolve())] * len(part)
        index += list(range(1, len(part) + 1))
    return paths, index


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

    clean = np.zeros((n_particles, box, box), np.float32)
    batch = 256
    for j in range(k):
        vol = torch.as_tensor(vols[j], dtype=torch.float64)
        grid = slice_grid(prepare_volume(vol))
        idx = np.flatnonzero(labels == j)
        for b in range(0, len(idx), batch):
            rows = idx[b:b + batch]
            c = ctf_values(ctfp, kk[:, 0], kk[:, 1], box, pixel_size_A, rows) if ctf else None
            img = project_images(vol, torch.as_tensor(rots[rows]), torch.as_tensor(origins_px[rows]), ctf=c,
                                 prepared=grid)
            clean[rows] = img.numpy()
        log(f"simulate: projected class {j + 1} ({len(idx)} particles)")
    signal_var = float(clean.var())
    sigma = math.sqrt(signal_var / snr)
    noisy = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32)

    paths, index = write_stacks(out, noisy, pixel_size_A, stack_size)
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
