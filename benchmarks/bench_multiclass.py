"""Multiclass refinement benchmark: our core against RELION's Class3D on the same simulated data.

Simulates a realistic case (default: box 64 at 2 A/px, 2000 particles, CTF, SNR 0.1,
two conformations differing by a domain motion, particles WITHOUT alignment), runs
``python -m hetplugin.core multiclass`` and, when installed, ``relion_refine --K``
with equivalent settings (global search from the consensus map low-passed to the same
resolution), and prints for both: class accuracy and adjusted Rand index against the
truth, FSC of each class map against its true map (resolution at 0.5 and 0.143),
median angular error (also with each class's frame turn removed: a class map may come out
turned as a whole, and its particles' poses with it), wall time, peak memory (and the part of
ours that ``import torch`` alone takes), and the ratios.

    python benchmarks/bench_multiclass.py [--particles 2000] [--box 64] [--snr 0.1] [--skip-relion]
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hetplugin.core.fsc import fsc, resolution_at
from hetplugin.core.iterations import default_iterations
from hetplugin.core.mrc import read_volume
from hetplugin.core.rotations import angular_distance_deg, euler_to_matrix
from hetplugin.core.simulate import simulate
from hetplugin.core.starfile import read_particles


def adjusted_rand_index(a, b) -> float:
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    comb = lambda x: x * (x - 1) / 2.0
    rows, cols = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = rows * cols / comb(len(a))
    return float((comb(table).sum() - expected) / (0.5 * (rows + cols) - expected))


def evaluate(star: Path, maps: list[Path], truth_dir: Path, k: int) -> dict:
    found = read_particles(star)
    truth = read_particles(truth_dir / "truth_particles.star")
    if len(found) != len(truth):
        raise ValueError(f"{star}: {len(found)} particles, truth has {len(truth)}")
    best, perm = -1.0, None
    for p in itertools.permutations(range(k)):
        acc = float(np.mean(np.asarray(p)[found.class_number - 1] + 1 == truth.class_number))
        if acc > best:
            best, perm = acc, p
    r_found = euler_to_matrix(found.rot_deg, found.tilt_deg, found.psi_deg)
    r_true = euler_to_matrix(truth.rot_deg, truth.tilt_deg, truth.psi_deg)
    err = angular_distance_deg(r_found, r_true)
    frame_err, frames = err.copy(), []
    for j in range(k):
        sel = found.class_number == j + 1
        if sel.any():
            frame = frame_rotation(r_true[sel], r_found[sel])
            frame_err[sel] = angular_distance_deg(r_found[sel], r_true[sel] @ frame)
            frames.append(float(angular_distance_deg(frame[None], np.eye(3)[None])[0]))
    px = float(truth.pixel_size_A[0])
    res = []
    for j in range(k):
        true_map, _ = read_volume(truth_dir / f"truth_class_{perm[j] + 1:03d}.mrc")
        m, _ = read_volume(maps[j])
        curve = fsc(m, true_map)
        res.append((resolution_at(curve, 0.5, m.shape[0], px), resolution_at(curve, 0.143, m.shape[0], px)))
    return dict(accuracy=best, ari=adjusted_rand_index(found.class_number, truth.class_number),
                median_angle_error_deg=float(np.median(err)), median_frame_error_deg=float(np.median(frame_err)),
                frame_rotation_deg=frames, fsc=res)


def frame_rotation(r_true: np.ndarray, r_found: np.ndarray, within_deg: float = 30.0) -> np.ndarray:
    """The rotation F (3, 3) with r_found ~ r_true @ F for one class.

    A class map may come out turned by a few degrees (the frame of a map is free in
    refinement); its particles' poses then carry the same turn. F is the chordal mean of
    r_true^T r_found over the particles within ``within_deg`` of the current estimate
    (twice refined, so that particles at a wrong pose do not pull it).
    """
    rel = np.einsum("nji,njk->nik", r_true, r_found)
    frame = np.eye(3)
    for _ in range(3):
        near = angular_distance_deg(rel, np.broadcast_to(frame, rel.shape)) < within_deg
        u, _, vt = np.linalg.svd(rel[near].mean(0) if near.any() else rel.mean(0))
        frame = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    return frame


# Runs a command as its own child and writes that child's peak RSS (KB) to a file. The peak RSS
# of a process started straight from this one would count this one's resident memory too
# (Linux records the parent's at fork/exec: a 400 MB Python process reports 414 MB for
# /bin/true), so commands start from this small interpreter instead.
_MEASURE = ("import os, sys\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.execvp(sys.argv[2], sys.argv[2:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS of that process in MB)."""
    peak = log.with_suffix(".peak_kb")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call([sys.executable, "-S", "-c", _MEASURE, str(peak)] + cmd, cwd=cwd, stdout=fh,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if code:
        raise subprocess.CalledProcessError(code, cmd)
    return wall, int(peak.read_text()) / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_out/multiclass", help="working folder")
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--lowpass", type=float, default=30.0, help="initial low-pass of the consensus map (A)")
    p.add_argument("--iterations", type=int, default=0,
                   help="our maximum number of iterations (default 0, the core's: 25 for two classes, 5 more per "
                        "further class)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--relion-healpix-order", type=int, default=2, help="2 = 15 deg, 3 = 7.5 deg")
    p.add_argument("--relion-iterations", type=int, default=None,
                   help="RELION's iterations (default --iterations; fewer when its run would take hours)")
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--device", default="cpu", help="device of our run: cpu, cuda (RELION runs on the CPU)")
    p.add_argument("--maps", nargs="+", default=None, metavar="MRC",
                   help="simulate from these class maps (one per class, same box; e.g. maps of atomic models) "
                        "instead of the built-in pseudo-atomic phantoms; sets --classes, --box and --pixel-size")
    p.add_argument("--fractions", nargs="+", type=float, default=None,
                   help="class populations (one per class, normalised; default equal)")
    a = p.parse_args()
    volumes = None
    if a.maps:
        volumes = np.stack([read_volume(m)[0] for m in a.maps])
        a.classes, a.box = len(volumes), volumes.shape[-1]
        a.pixel_size = read_volume(a.maps[0])[1] or a.pixel_size
    work = Path(a.work).resolve()
    sim = work / "sim"
    if not (sim / "truth.json").exists():
        simulate(sim, n_particles=a.particles, n_classes=a.classes, box=a.box, pixel_size_A=a.pixel_size, snr=a.snr,
                 seed=a.seed, with_alignment=False, volumes=volumes, class_fractions=a.fractions)
    diameter = 0.6 * a.box * a.pixel_size
    ours = work / "ours"
    cmd = [sys.executable, "-m", "hetplugin.core", "multiclass", "--particles", str(sim / "particles.star"),
           "--reference", str(sim / "consensus.mrc"), "--out", str(ours), "--classes", str(a.classes),
           "--iterations", str(a.iterations), "--initial-lowpass", str(a.lowpass), "--threads", str(a.threads),
           "--particle-diameter", str(diameter), "--seed", str(a.seed), "--device", a.device]
    t_ours, mem_ours = timed(cmd, work, work / "ours.log")
    r_ours = evaluate(ours / "particles.star", [ours / f"class_{j + 1:03d}.mrc" for j in range(a.classes)],
                      sim, a.classes)
    rows = [("hetplugin", r_ours, t_ours, mem_ours)]
    if not a.skip_relion and shutil.which("relion_refine"):
        rel = work / "relion"
        rel_iter = a.relion_iterations or a.iterations or default_iterations(a.classes)
        rel.mkdir(parents=True, exist_ok=True)
        cmd = ["relion_refine", "--i", str(sim / "particles.star"), "--ref", str(sim / "consensus.mrc"),
               "--o", str(rel / "run"), "--K", str(a.classes), "--iter", str(rel_iter), "--tau2_fudge", "4",
               "--ini_high", str(a.lowpass), "--particle_diameter", str(diameter), "--ctf", "--flatten_solvent",
               "--zero_mask", "--oversampling", "1", "--healpix_order", str(a.relion_healpix_order),
               "--offset_range", "5", "--offset_step", "2", "--sym", "C1", "--norm", "--scale",
               "--j", str(a.threads), "--pool", "30", "--dont_combine_weights_via_disc", "--random_seed",
               str(a.seed), "--firstiter_cc"]
        t_rel, mem_rel = timed(cmd, rel, work / "relion.log")
        it = f"{rel_iter:03d}"
        r_rel = evaluate(rel / f"run_it{it}_data.star",
                         [rel / f"run_it{it}_class{j + 1:03d}.mrc" for j in range(a.classes)], sim, a.classes)
        rows.append((f"RELION {rel_iter} it", r_rel, t_rel, mem_rel))
    print(f"data: {a.particles} particles, box {a.box} at {a.pixel_size} A/px, SNR {a.snr}, K={a.classes}, "
          f"global search from the consensus low-passed to {a.lowpass} A, {a.threads} threads, ours on {a.device}")
    print(f"{'program':>14} {'accuracy':>9} {'ARI':>6} {'med.ang.err':>11} {'FSC0.5/0.143 per class (A)':>30} "
          f"{'wall s':>8} {'peak MB':>8}")
    for name, r, t, m in rows:
        fscs = " ".join(f"{x:.1f}/{y:.1f}" for x, y in r["fsc"])
        print(f"{name:>14} {r['accuracy']:>9.3f} {r['ari']:>6.3f} {r['median_angle_error_deg']:>11.1f} "
              f"{fscs:>30} {t:>8.1f} {m:>8.0f}")
    print("pose error with each class's frame turn removed (a class map may come out turned as a whole): "
          + "; ".join(f"{name} median {r['median_frame_error_deg']:.1f} deg (turns "
                      + ", ".join(f"{f:.1f}" for f in r["frame_rotation_deg"]) + " deg)" for name, r, _, _ in rows))
    _, mem_torch = timed([sys.executable, "-c", "import torch"], work, work / "import_torch.log")
    print(f"peak memory of 'import torch' alone, part of every run of ours: {mem_torch:.0f} MB "
          f"(ours beyond it: {mem_ours - mem_torch:.0f} MB)")
    if len(rows) == 2:
        (_, ro, to, mo), (_, rr, tr, mr) = rows
        print(f"ratios (hetplugin / RELION): accuracy {ro['accuracy'] / rr['accuracy']:.3f}, "
              f"wall time {to / tr:.3f}, peak memory {mo / mr:.3f} ({(mo - mem_torch) / mr:.3f} for ours beyond "
              "'import torch')")


if __name__ == "__main__":
    main()
