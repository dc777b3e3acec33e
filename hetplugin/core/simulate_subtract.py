"""Simulated data for signal subtraction, with the kept region and the rest projected separately.

A small complex made of Gaussian "atoms" (:class:`hetplugin.core.simulate.Phantom`
groups): a domain to keep, a static domain and a mobile domain to subtract (the
mobile one closes by a hinge rotation in a fraction of the particles), and a
low-contrast micelle-like belt around the part to subtract. Images are built
from ANALYTIC projections of the atoms (a 3D Gaussian of width r integrates along
z to r*sqrt(2 pi) times a 2D Gaussian), so the truth does not share the Fourier
projector that the subtraction uses:

    X_i = c_i * (CTF_i . kept_i + CTF_i . rest_i) + noise_i

with ``kept_i`` the projection of the kept atoms and ``rest_i`` that of every
other atom in the particle's state, at its pose (rotation A, RELION origin o: a
3D point r lands at (A r)[:2] - o), ``c_i`` an optional per-particle contrast
factor. Maps (``render`` of the same atoms on the voxel grid) and a soft mask
around the kept domain are returned with the images; nothing here is used by the
engine itself, only by tests and benchmarks.

With ``kept_wobble_deg`` the kept domain is also flexible: in each particle it is
turned about its own centre g by a random rotation R_i (a random axis, an angle
uniform up to that bound) relative to the rest, so its own pose differs from the
particle's (the complex's) pose. Its atoms then land where those of the unturned
domain land at rotation A R_i and origin o - (A (I - R_i) g)[:2]: the truth that a
focused refinement of the kept region should find.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .ctf import ctf_values
from .fourier import half_plane_coords, irfft2_centered, rfft2_centered
from .masks import soft_threshold_mask, spherical_mask
from .mrc import write_volume
from .rotations import matrix_to_euler, random_rotations
from .poses import rotvec_to_matrix
from .simulate import Phantom, make_phantom, move_domain, random_ctf, render, write_stacks
from .starfile import new_particle_table, write_particles


@dataclass
class ComplexModel:
    """Atom groups of the test complex in pixels from the box centre (x, y, z).

    ``kept`` is the domain to keep; ``rest`` holds, per state, the atoms to subtract
    (static domain + mobile domain in that state); ``micelle`` the low-contrast belt
    (same in every state) with its relative density ``micelle_amplitude``.
    """
    box: int
    kept: Phantom
    rest: list[Phantom]
    micelle: Phantom
    micelle_amplitude: float

    @property
    def n_states(self) -> int:
        return len(self.rest)


def _cluster(rng: np.random.Generator, centre, n: int, spread: float, r_lo: float, r_hi: float, label: int) -> Phantom:
    c = np.asarray(centre, float) + rng.normal(0.0, spread, (n, 3))
    return Phantom(c, rng.uniform(r_lo, r_hi, n), np.full(n, label))


def _join(*parts: Phantom) -> Phantom:
    return Phantom(np.concatenate([p.centres for p in parts]), np.concatenate([p.radii for p in parts]),
                   np.concatenate([p.domain for p in parts]))


def make_complex(box: int = 64, seed: int = 0, closed_angle_deg: float = 30.0, n_states: int = 2,
                 micelle_amplitude: float = 0.15) -> ComplexModel:
    """A kept domain beside a static + mobile pair wrapped in a micelle-like belt.

    State 1 is open; state 2 (if ``n_states`` is 2) has the mobile domain rotated by
    ``closed_angle_deg`` about its hinge with the static domain. Sizes scale with the box.
    """
    if n_states not in (1, 2):
        raise ValueError("n_states must be 1 or 2")
    rng = np.random.default_rng(seed)
    s = box / 64.0
    kept = _cluster(rng, (-13 * s, 2 * s, 0), 10, 2.0 * s, 1.5 * s, 2.1 * s, 0)
    static = _cluster(rng, (6 * s, -7 * s, 1 * s), 12, 2.2 * s, 1.5 * s, 2.1 * s, 1)
    mobile = _cluster(rng, (9 * s, 8 * s, -2 * s), 10, 2.0 * s, 1.5 * s, 2.1 * s, 2)
    pair = _join(static, mobile)
    states = [pair]
    if n_states == 2:
        states.append(move_domain(pair, 2, closed_angle_deg, rng))
    angles = np.linspace(0, 2 * math.pi, 9)[:-1]
    ring = np.stack([np.full(8, 9.0 * s), 11.0 * s * np.cos(angles), 11.0 * s * np.sin(angles)], 1)
    micelle = Phantom(ring + np.array([0, 0.5 * s, 0]), np.full(8, 4.0 * s), np.full(8, 3))
    return ComplexModel(box, kept, states, micelle, micelle_amplitude)


def make_flexible(box: int = 64, seed: int = 0, n_domains: int = 2, kept_domain: int = 1,
                  atoms_per_domain: int = 150) -> ComplexModel:
    """A protein-like particle (:func:`hetplugin.core.simulate.make_phantom`: domains of
    pseudo-atoms at a C-alpha spacing) whose domain ``kept_domain`` is the region to keep and
    the other domains the rest; no micelle. With ``kept_wobble_deg`` in
    :func:`simulate_subtraction` the kept domain is a flexible one: a focused refinement test."""
    ph = make_phantom(box, np.random.default_rng(seed), n_domains=n_domains, atoms_per_domain=atoms_per_domain)
    sel = ph.domain == kept_domain
    kept = Phantom(ph.centres[sel], ph.radii[sel], ph.domain[sel])
    rest = Phantom(ph.centres[~sel], ph.radii[~sel], ph.domain[~sel])
    none = Phantom(np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64))
    return ComplexModel(box, kept, [rest], none, 0.0)


def complex_maps(model: ComplexModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept map (D, D, D), rest maps (K, D, D, D), full maps (K, D, D, D)), float32."""
    kept = render(model.kept, model.box)
    mic = model.micelle_amplitude * render(model.micelle, model.box)
    rest = np.stack([render(p, model.box) + mic for p in model.rest])
    return kept, rest, (kept[None] + rest).astype(np.float32)


def kept_mask(model: ComplexModel, threshold: float = 0.05, extend_px: float = 1.0, edge_px: float = 3.0) -> np.ndarray:
    """Soft mask (values in [0, 1]) around the kept domain."""
    kept = render(model.kept, model.box)
    return soft_threshold_mask(kept, threshold * float(kept.max()), extend_px, edge_px)


def project_atoms(ph: Phantom, rotations: np.ndarray, origins_px: np.ndarray, box: int,
                  amplitude: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Exact line integrals (n, D, D) of the Gaussian atoms at poses (rotation (n, 3, 3), RELION origin (n, 2) px).

    Atom j (centre c_j, width r_j) projects to r_j sqrt(2 pi) exp(-|x - p_j|^2 / (2 r_j^2)),
    p_j = (A c_j)[:2] - o, with x measured from the image centre (index D // 2).
    """
    rot = torch.as_tensor(np.asarray(rotations), dtype=dtype)
    pos = torch.einsum("nij,aj->nai", rot[:, :2, :], torch.as_tensor(ph.centres, dtype=dtype))
    pos = pos - torch.as_tensor(np.asarray(origins_px), dtype=dtype)[:, None, :]
    ax = torch.arange(box, dtype=dtype) - box // 2
    r = torch.as_tensor(np.asarray(ph.radii, float), dtype=dtype)
    gx = torch.exp(-(ax[None, None, :] - pos[:, :, 0:1]) ** 2 / (2 * r * r)[None, :, None])   # (n, atoms, x)
    gy = torch.exp(-(ax[None, None, :] - pos[:, :, 1:2]) ** 2 / (2 * r * r)[None, :, None])   # (n, atoms, y)
    gy = gy * (amplitude * math.sqrt(2 * math.pi) * r)[None, :, None]
    out = torch.bmm(gy.transpose(1, 2), gx)                                                     # (n, y, x)
    return out


def apply_ctf_full(images: torch.Tensor, ctf_params, rows, pixel_size_A: float) -> torch.Tensor:
    """CTF applied on every half-plane frequency (no resolution cut), real images in and out."""
    box = images.shape[-1]
    k = torch.as_tensor(half_plane_coords(box), dtype=images.dtype).reshape(-1, 2)
    c = ctf_values(ctf_params, k[:, 0], k[:, 1], box, pixel_size_A, rows).reshape(len(rows), box, box // 2 + 1)
    return irfft2_centered(rfft2_centered(images) * c, box)


@dataclass
class SubtractionTruth:
    """What :func:`simulate_subtraction` made: file names and the per-particle truth (float32 arrays)."""
    star: Path
    kept: np.ndarray            # (N, D, D) c_i * CTF . projection of the kept domain
    rest: np.ndarray            # (N, D, D) c_i * CTF . projection of everything else
    noise: np.ndarray           # (N, D, D)
    contrast: np.ndarray        # (N,) c_i
    states: np.ndarray          # (N,) 0-based state
    rotations: np.ndarray       # (N, 3, 3)
    origins_px: np.ndarray      # (N, 2)
    kept_map: np.ndarray        # (D, D, D)
    maps: np.ndarray            # (K, D, D, D) full map per state
    mask: np.ndarray            # (D, D, D) soft mask of the kept domain
    model: ComplexModel
    kept_rotations: np.ndarray | None = None   # (N, 3, 3) the kept domain's own pose (with a wobble)
    kept_origins_px: np.ndarray | None = None  # (N, 2) and origin
    paths: dict = field(default_factory=dict)


def simulate_subtraction(out_dir: str | Path, n_particles: int = 300, box: int = 64, pixel_size_A: float = 2.0,
                         snr: float | None = 0.1, seed: int = 0, n_states: int = 1, closed_fraction: float = 0.3,
                         contrast_sd: float = 0.0, max_origin_px: float = 3.0, stack_size: int = 1000,
                         write_class_numbers: bool = False, batch_size: int = 256,
                         kept_wobble_deg: float = 0.0, model: ComplexModel | None = None) -> SubtractionTruth:
    """Images of the complex of :func:`make_complex` with the truth split into kept and rest.

    ``snr`` (variance of the clean images inside the particle disc over the noise variance;
    None for no noise), ``contrast_sd`` draws c_i ~ 1 + N(0, sd) (clipped to [0.3, 1.7]).
    Writes ``particles.star`` (with CTF and poses; with rlnClassNumber = state + 1 when
    ``write_class_numbers``), stacks, ``map_state_K.mrc``, ``consensus.mrc`` (the state
    maps weighted by their particle counts), ``kept.mrc`` and ``mask_keep.mrc``.
    """
    if box % 2:
        raise ValueError(f"box {box} is odd: use an even box")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if model is None:
        model = make_complex(box, seed, n_states=n_states)
    elif model.box != box or model.n_states != n_states:
        raise ValueError(f"the model has box {model.box} and {model.n_states} state(s), not {box} and {n_states}")
    kept_map, rest_maps, maps = complex_maps(model)
    mask = kept_mask(model)
    states = (rng.random(n_particles) < closed_fraction).astype(np.int64) if n_states == 2 \
        else np.zeros(n_particles, np.int64)
    rots = random_rotations(n_particles, rng)
    origins = rng.uniform(-max_origin_px, max_origin_px, (n_particles, 2))
    ctfp = random_ctf(n_particles, rng)
    contrast = np.clip(1.0 + contrast_sd * rng.standard_normal(n_particles), 0.3, 1.7) if contrast_sd > 0 \
        else np.ones(n_particles)
    kept_rots, kept_origins = kept_poses(model, rots, origins, kept_wobble_deg, rng)
    kept = np.zeros((n_particles, box, box), np.float32)
    rest = np.zeros_like(kept)
    for b in range(0, n_particles, batch_size):
        rows = np.arange(b, min(b + batch_size, n_particles))
        c = torch.as_tensor(contrast[rows])[:, None, None]
        k_img = project_atoms(model.kept, kept_rots[rows], kept_origins[rows], box)
        r_img = project_atoms(model.micelle, rots[rows], origins[rows], box, model.micelle_amplitude)
        for s in range(model.n_states):
            sel = states[rows] == s
            if sel.any():
                r_img[sel] += project_atoms(model.rest[s], rots[rows[sel]], origins[rows[sel]], box)
        kept[rows] = (c * apply_ctf_full(k_img, ctfp, rows, pixel_size_A)).numpy()
        rest[rows] = (c * apply_ctf_full(r_img, ctfp, rows, pixel_size_A)).numpy()
    clean = kept + rest
    if snr is None:
        noise = np.zeros_like(clean)
    else:
        disc = spherical_mask(box, 0.35 * box, 0, ndim=2) > 0.5
        sigma = math.sqrt(float(clean[:, disc].var()) / snr)
        noise = rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    images = clean + noise
    paths, index = write_stacks(out, images, pixel_size_A, stack_size)
    rot, tilt, psi = matrix_to_euler(rots)
    table = new_particle_table(
        np.array(paths, dtype=object), np.array(index), pixel_size_A, box, rot_deg=rot, tilt_deg=tilt, psi_deg=psi,
        shift_x_A=origins[:, 0] * pixel_size_A, shift_y_A=origins[:, 1] * pixel_size_A,
        defocus_u_A=ctfp.defocus_u_A, defocus_v_A=ctfp.defocus_v_A, defocus_angle_deg=ctfp.defocus_angle_deg,
        voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1,
        class_number=states + 1 if write_class_numbers else None,
        extra_columns={"rlnImageId": np.arange(1, n_particles + 1)})
    star = out / "particles.star"
    write_particles(star, table)
    files = {"particles": star, "kept": out / "kept.mrc", "mask": out / "mask_keep.mrc",
             "consensus": out / "consensus.mrc"}
    write_volume(files["kept"], kept_map, pixel_size_A)
    write_volume(files["mask"], mask, pixel_size_A)
    weights = np.bincount(states, minlength=model.n_states) / n_particles
    write_volume(files["consensus"], np.tensordot(weights, maps, 1), pixel_size_A)
    for s in range(model.n_states):
        files[f"state_{s + 1}"] = out / f"map_state_{s + 1}.mrc"
        write_volume(files[f"state_{s + 1}"], maps[s], pixel_size_A)
    return SubtractionTruth(star, kept, rest, noise, contrast, states, rots, origins, kept_map, maps, mask, model,
                            kept_rotations=kept_rots, kept_origins_px=kept_origins, paths=files)


def kept_poses(model: ComplexModel, rotations: np.ndarray, origins_px: np.ndarray, wobble_deg: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The kept domain's own poses (rotation (N, 3, 3), origin (N, 2) px) when it is turned in each
    particle about its centre g by a random rotation R_i of up to ``wobble_deg``: A R_i and
    o - (A (I - R_i) g)[:2]. Without a wobble, the particles' poses."""
    if wobble_deg <= 0:
        return rotations, origins_px
    n = len(rotations)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    turn = rotvec_to_matrix(axes * np.radians(rng.uniform(0.0, wobble_deg, n))[:, None])
    g = model.kept.centres.mean(0)
    moved = np.einsum("nij,nj->ni", rotations, g - np.einsum("nij,j->ni", turn, g))
    return np.einsum("nij,njk->nik", rotations, turn), origins_px - moved[:, :2]
