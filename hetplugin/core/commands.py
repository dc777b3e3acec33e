"""The core's commands: each is (help text, argument definitions, runner)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import multiclass_job
from . import subtract as subtract_job
from .dataset import ParticleDataset
from .device import resolve_device, set_threads
from .fsc import fsc, resolution_at
from .masks import spherical_mask
from .mrc import read_volume, write_volume
from .reconstruct import gold_standard_map
from .simulate import simulate
from .starfile import read_particles
from .symmetry import symmetry_group


def log(msg: str) -> None:
    print(msg, flush=True)


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that process particles."""
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: $HETPLUGIN_DEVICE, else auto: CUDA when available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=256, help="particles per batch (bounds memory)")
    p.add_argument("--root", default=None,
                   help="folder that relative image paths in the STAR file are relative to "
                        "(default: the STAR file's folder and its parents, as RELION projects lay them out)")


# ---------------------------------------------------------------- simulate
def add_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--particles", type=int, default=1000, help="number of particles")
    p.add_argument("--classes", type=int, default=2, help="number of structures (classes)")
    p.add_argument("--box", type=int, default=64, help="box size in pixels (even)")
    p.add_argument("--pixel-size", type=float, default=2.0, help="pixel size in A")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (variance ratio inside the particle)")
    p.add_argument("--heterogeneity", choices=["motion", "removal"], default="motion",
                   help="how classes differ: a domain motion (hinge rotation) or a missing domain")
    p.add_argument("--fractions", type=float, nargs="*", default=None, help="class fractions (default equal)")
    p.add_argument("--volumes", nargs="*", default=None,
                   help="MRC maps to use as the classes instead of built-in phantoms (same box)")
    p.add_argument("--max-origin", type=float, default=None, help="largest origin offset in A (default 5%% of the box)")
    p.add_argument("--no-ctf", action="store_true", help="simulate without CTF")
    p.add_argument("--no-alignment", action="store_true",
                   help="leave poses out of particles.star (they stay in truth_particles.star)")
    p.add_argument("--stack-size", type=int, default=1000, help="images per MRC stack file")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run_simulate(a: argparse.Namespace) -> None:
    vols = None
    if a.volumes:
        vols = np.stack([read_volume(v)[0] for v in a.volumes])
    simulate(a.out, n_particles=a.particles, n_classes=a.classes, box=a.box, pixel_size_A=a.pixel_size,
             snr=a.snr, seed=a.seed, heterogeneity=a.heterogeneity, class_fractions=a.fractions, volumes=vols,
             max_origin_A=a.max_origin, ctf=not a.no_ctf, with_alignment=not a.no_alignment,
             stack_size=a.stack_size, log=log)


# ---------------------------------------------------------------- reconstruct
def add_reconstruct(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", required=True, help="RELION STAR file of particles with alignment")
    p.add_argument("--out", required=True, help="output folder: reconstruction.mrc, half1/2.mrc, fsc.json")
    p.add_argument("--symmetry", default="C1", help="point group (C1, Cn, Dn, T, O, I)")
    p.add_argument("--no-ctf", action="store_true", help="do not correct for the CTF")
    p.add_argument("--ctf-intact-first-peak", action="store_true", help="ignore the CTF until its first peak")
    p.add_argument("--mask-diameter", type=float, default=None,
                   help="diameter in A of the soft spherical mask used for the FSC (default 90%% of the box)")
    p.add_argument("--tau2-fudge", type=float, default=1.0, help="regularisation factor T (higher: less smoothing)")
    p.add_argument("--truth", default=None, help="a true map: also report the FSC against it")
    p.add_argument("--seed", type=int, default=0, help="random seed for half-set assignment")
    add_common(p)


def run_reconstruct(a: argparse.Namespace) -> None:
    set_threads(a.threads)
    device = resolve_device(a.device)
    table = read_particles(a.particles, root=a.root)
    ds = ParticleDataset(table, device, use_ctf=not a.no_ctf, intact_first_peak=a.ctf_intact_first_peak)
    if not ds.has_alignment:
        raise ValueError(f"{a.particles}: reconstruction needs particles with alignment (rlnAngleRot/Tilt/Psi)")
    sym = symmetry_group(a.symmetry)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n, box, px = len(ds), ds.box, ds.pixel_size_A
    log(f"reconstruct: {n} particles, box {box}, {px:.3f} A/px, symmetry {a.symmetry}, device {device}")
    diameter_px = 0.9 * box if a.mask_diameter is None else a.mask_diameter / px
    mask = spherical_mask(box, diameter_px / 2, edge_px=3)
    full, maps, curve = gold_standard_map(ds, half_sets(table, a.seed), fsc_mask=mask, tau2_fudge=a.tau2_fudge,
                                          symmetry=sym, batch_size=a.batch_size, log=log)
    res = resolution_at(curve, 0.143, box, px)
    write_volume(out / "reconstruction.mrc", full, px)
    write_volume(out / "half1.mrc", maps[0], px)
    write_volume(out / "half2.mrc", maps[1], px)
    report = dict(n_particles=n, box=box, pixel_size_A=px, symmetry=a.symmetry,
                  shells=list(range(len(curve))), fsc_half=curve.tolist(), resolution_0143_A=res)
    log(f"reconstruct: half-set FSC 0.143 resolution {res:.2f} A")
    if a.truth:
        truth, _ = read_volume(a.truth)
        if truth.shape != full.shape:
            raise ValueError(f"{a.truth}: the true map is {truth.shape[0]} px, the reconstruction {box} px")
        tcurve = fsc(full, truth, mask)
        report.update(fsc_truth=tcurve.tolist(), resolution_truth_05_A=resolution_at(tcurve, 0.5, box, px))
        log(f"reconstruct: FSC against the truth 0.5 resolution {report['resolution_truth_05_A']:.2f} A")
    (out / "fsc.json").write_text(json.dumps(report, indent=1))
    log(f"reconstruct: wrote {out / 'reconstruction.mrc'}")
    ds.close()


def half_sets(table, seed: int) -> np.ndarray:
    """Half-set label 1/2 per particle: rlnRandomSubset when present, else a seeded random split."""
    if table.random_subset is not None and set(np.unique(table.random_subset)) <= {1, 2} \
            and len(np.unique(table.random_subset)) == 2:
        return np.asarray(table.random_subset, dtype=np.int64)
    rng = np.random.default_rng(seed)
    halves = np.ones(len(table), dtype=np.int64)
    halves[rng.permutation(len(table))[len(table) // 2:]] = 2
    return halves


COMMANDS = {
    "simulate": ("simulate a heterogeneous particle data set with ground truth", add_simulate, run_simulate),
    "reconstruct": ("CTF-corrected, regularised reconstruction from known poses with half-set FSC",
                    add_reconstruct, run_reconstruct),
    "multiclass": ("multiclass refinement (3D classification) of particles against one or K references",
                   multiclass_job.add_arguments, lambda a: multiclass_job.run(a, log)),
    "subtract": ("signal subtraction: remove the CTF-modulated projection of the density outside (or inside) a mask "
                 "from each particle, optionally per class, with scale fitting, recentring and re-boxing",
                 subtract_job.add_arguments, lambda a: subtract_job.run(a, log)),
    "revert-subtraction": ("point subtracted particles back at their original images, carrying the alignment over",
                           subtract_job.add_revert_arguments, lambda a: subtract_job.run_revert(a, log)),
}
