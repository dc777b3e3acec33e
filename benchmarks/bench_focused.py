"""Focused refinement: ours (``multiclass --classes 1`` with the focus mask and a local search)
against ``relion_refine --auto_refine`` with the same mask and local searches, on the same
signal-subtracted particles.

Data (``hetplugin.core.simulate_subtract`` with ``make_flexible``): a two-domain particle whose
kept domain turns in every particle by up to ``--wobble`` degrees about its own centre relative to
the other domain, projected analytically with CTF and noise. The particles' alignment is the
complex's (the consensus poses), so it is wrong for the kept domain. The other domain is
subtracted with the consensus map (``subtract``, region to keep = the domain's mask), and both
programs refine the kept domain from the consensus poses, the masked consensus map low-passed to
``--lowpass`` as their start.

Printed for the consensus poses (a reconstruction at them), ours and RELION: the median angle
between each particle's pose and the kept domain's true one, the FSC of the map against the true
domain map inside the mask (0.5 / 0.143), wall time and peak memory (each program its own process;
RELION's auto-refine needs MPI for its half sets: ``mpirun -np T+1 relion_refine_mpi --j 1``, and
its peak is that of its largest rank), and the ratios.

    python benchmarks/bench_focused.py [--particles 2000] [--snr 1] [--wobble 20] [--skip-relion]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from bench_multiclass import timed
from hetplugin.core.fsc import fsc, resolution_at
from hetplugin.core.mrc import read_volume
from hetplugin.core.rotations import angular_distance_deg, euler_to_matrix
from hetplugin.core.simulate_subtract import make_flexible, simulate_subtraction
from hetplugin.core.starfile import read_particles


def evaluate(star: Path, volume: np.ndarray, truth: dict, box: int, px: float) -> dict:
    """Median pose error against the kept domain's true poses, masked FSC against its true map."""
    t = read_particles(star)
    order = np.argsort(np.asarray(t.columns["rlnImageId"], dtype=np.int64))
    rot = euler_to_matrix(t.rot_deg, t.tilt_deg, t.psi_deg)[order]
    err = angular_distance_deg(rot, truth["rotations"])
    curve = np.asarray(fsc(torch.as_tensor(volume * truth["mask"]), torch.as_tensor(truth["map"] * truth["mask"])))
    return dict(pose=float(np.median(err)), fsc05=resolution_at(curve, 0.5, box, px),
                fsc0143=resolution_at(curve, 0.143, box, px))


def relion_result(folder: Path) -> tuple[Path, np.ndarray]:
    """RELION's final (or, when stopped by --auto_iter_max, last) particles and map."""
    if (folder / "run_data.star").exists():
        return folder / "run_data.star", read_volume(folder / "run_class001.mrc")[0]
    last = sorted(folder.glob("run_it*_data.star"))[-1]
    it = last.name[len("run_it"):len("run_it") + 3]
    halves = [read_volume(folder / f"run_it{it}_half{h}_class001.mrc")[0] for h in (1, 2)]
    return last, 0.5 * (halves[0] + halves[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_out/focused", help="working folder")
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--wobble", type=float, default=20.0, help="largest turn of the kept domain (deg)")
    p.add_argument("--atoms", type=int, default=300, help="pseudo-atoms (residues) per domain")
    p.add_argument("--lowpass", type=float, default=15.0, help="initial low-pass of the masked consensus (A)")
    p.add_argument("--angular-step", type=float, default=3.0)
    p.add_argument("--local-search", type=float, default=15.0, help="our local search range (deg)")
    p.add_argument("--finest-step", type=float, default=None, help="our sampling refinement down to this step")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--device", default="cpu", help="device of our run: cpu, cuda (RELION runs on the CPU)")
    p.add_argument("--relion-healpix-order", type=int, default=4, help="4 = 3.75 deg, 5 = 1.875 deg")
    p.add_argument("--relion-sigma-ang", type=float, default=5.0,
                   help="RELION's prior width for local searches (it searches +/- 3 of them)")
    p.add_argument("--relion-iterations", type=int, default=None, help="--auto_iter_max (default --iterations)")
    p.add_argument("--skip-relion", action="store_true")
    a = p.parse_args()
    work = Path(a.work).resolve()
    sim, sub = work / "sim", work / "sub"
    truth_file = work / "truth.npz"
    if not truth_file.exists():
        shutil.rmtree(sim, ignore_errors=True)
        t = simulate_subtraction(sim, n_particles=a.particles, box=a.box, pixel_size_A=a.pixel_size, snr=a.snr,
                                 seed=a.seed, kept_wobble_deg=a.wobble,
                                 model=make_flexible(a.box, seed=a.seed, atoms_per_domain=a.atoms))
        np.savez(truth_file, rotations=t.kept_rotations, map=t.kept_map, mask=t.mask)
    truth = dict(np.load(truth_file))
    core = [sys.executable, "-m", "hetplugin.core"]
    if not (sub / "particles_subtracted.star").exists():
        timed(core + ["subtract", "--particles", str(sim / "particles.star"), "--map", str(sim / "consensus.mrc"),
                      "--mask", str(sim / "mask_keep.mrc"), "--mask-meaning", "keep", "--out", str(sub),
                      "--threads", str(a.threads)], work, work / "subtract.log")
    star = sub / "particles_subtracted.star"
    timed(core + ["reconstruct", "--particles", str(star), "--out", str(work / "consensus"), "--threads",
                  str(a.threads)], work, work / "consensus.log")
    rows = [("consensus poses", evaluate(star, read_volume(work / "consensus" / "reconstruction.mrc")[0], truth,
                                         a.box, a.pixel_size), None, None)]
    ours = work / "ours"
    shutil.rmtree(ours, ignore_errors=True)
    cmd = core + ["multiclass", "--particles", str(star), "--reference", str(sim / "consensus.mrc"), "--mask",
                  str(sim / "mask_keep.mrc"), "--classes", "1", "--min-class-size", "1", "--local-search",
                  str(a.local_search), "--angular-step", str(a.angular_step), "--initial-lowpass", str(a.lowpass),
                  "--iterations", str(a.iterations), "--out", str(ours), "--threads", str(a.threads), "--seed",
                  str(a.seed), "--device", a.device, "--final-reconstruction"]
    if a.finest_step:
        cmd += ["--finest-step", str(a.finest_step)]
    t_ours, m_ours = timed(cmd, work, work / "ours.log")
    rows.append(("hetplugin", evaluate(ours / "particles.star", read_volume(ours / "class_001.mrc")[0], truth,
                                       a.box, a.pixel_size), t_ours, m_ours))
    if not a.skip_relion and shutil.which("relion_refine_mpi") and shutil.which("mpirun"):
        rel = work / "relion"
        shutil.rmtree(rel, ignore_errors=True)
        rel.mkdir(parents=True)
        diameter = 0.8 * a.box * a.pixel_size
        # auto-refine's half sets need MPI: a leader and one rank per thread, one thread each
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(a.threads + 1), "relion_refine_mpi",
               "--i", str(star), "--ref", str(sim / "consensus.mrc"), "--o", str(rel / "run"),
               "--auto_refine", "--split_random_halves", "--ini_high", str(a.lowpass), "--particle_diameter",
               str(diameter), "--solvent_mask", str(sim / "mask_keep.mrc"), "--ctf", "--flatten_solvent",
               "--zero_mask", "--oversampling", "1", "--healpix_order", str(a.relion_healpix_order),
               "--auto_local_healpix_order", str(a.relion_healpix_order), "--sigma_ang", str(a.relion_sigma_ang),
               "--offset_range", "5", "--offset_step", "1", "--sym", "C1", "--norm", "--scale", "--pad", "2",
               "--j", "1", "--pool", "30", "--dont_combine_weights_via_disc", "--random_seed",
               str(a.seed), "--low_resol_join_halves", "40", "--auto_iter_max",
               str(a.relion_iterations or a.iterations)]
        t_rel, m_rel = timed(cmd, rel, work / "relion.log")
        rel_star, rel_map = relion_result(rel)
        rows.append(("RELION", evaluate(rel_star, rel_map, truth, a.box, a.pixel_size), t_rel, m_rel))
    print(f"data: {a.particles} particles, box {a.box} at {a.pixel_size} A/px, SNR {a.snr}, kept domain turned by up "
          f"to {a.wobble:g} deg, {a.atoms} atoms per domain; start {a.lowpass:g} A; ours: {a.angular_step:g} deg "
          f"steps within {a.local_search:g} deg"
          + (f", refined to {a.finest_step:g} deg" if a.finest_step else "")
          + f", {a.threads} threads on {a.device}")
    print(f"{'poses':>16} {'median pose error':>18} {'FSC 0.5/0.143 vs truth (A)':>28} {'wall s':>8} {'peak MB':>8}")
    for name, r, t, m in rows:
        tail = f"{t:>8.1f} {m:>8.0f}" if t is not None else f"{'':>8} {'':>8}"
        print(f"{name:>16} {r['pose']:>14.2f} deg {r['fsc05']:>14.1f} / {r['fsc0143']:<11.1f} {tail}")
    if len(rows) == 3:
        (_, ro, to, mo), (_, rr, tr, mr) = rows[1], rows[2]
        print(f"ratios (hetplugin / RELION): pose error {ro['pose'] / rr['pose']:.2f}, wall time {to / tr:.3f}, "
              f"peak memory {mo / mr:.3f} (RELION: its largest MPI rank)")


if __name__ == "__main__":
    main()
