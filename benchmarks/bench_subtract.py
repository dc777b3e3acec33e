"""Signal subtraction: ours against relion_particle_subtract on the same data, maps, mask and poses.

Data: the two-state complex of ``hetplugin.core.simulate_subtract`` (a kept domain; a static
and a mobile domain, closed in 30% of the particles, plus a low-contrast micelle-like belt,
all to subtract), projected analytically at known poses with CTF and noise at each SNR.
For each SNR and map, the residual against the truth is

    ||X' - (kept + noise)|| / ||kept||       (the issue's figure; the noise is the images' own)

with the maps: the exact consensus (state maps weighted by their populations: the floor of
any single-map subtraction), the exact map of each particle's own state (rlnClassNumber),
and the same two REconstructed from the noisy images at the true poses (our reconstruct,
half-set FSC weighting), as a refinement would give them.

relion_particle_subtract needs an optimiser.star; a 1-iteration relion_refine (Class3D,
--skip_align) on the first 1000 particles makes one (K=1, and K=2 for per-class maps), then its
class maps are replaced by ours and rlnCurrentImageSize is set to the full box, so RELION projects
exactly our maps to Nyquist; the particles are given with --data. Our rlnClassNumber column is
added for RELION 3.1 (it reads the class unconditionally).

Timing: each program runs as its own process under /usr/bin/time (wall, user+sys CPU, peak
RSS), with --threads T for ours (T worker processes on the CPU) and T MPI ranks for RELION
(T=1: the serial program). Images/s are reported on wall time and on CPU time (the latter is
robust on a shared machine), for

  whole run   N images, start-up (Python and torch imports, map preparation, STAR files) included;
  marginal    the steady state: (N - N/5) / (t(N) - t(N/5)), each program also run on the first
              N/5 particles, so that fixed costs cancel; fixed = t(N) - N / marginal is what
              a run costs on top of its images (start-up);
  loop        ours only: the batch loop's own rate, from our log.

Whole-run ratios depend on N (fixed costs weigh less on larger sets): run with --particles 50000
(800 MB of images at box 64) and --maps "exact consensus" for figures at a realistic set size.

    python benchmarks/bench_subtract.py [--particles 2000] [--snr 0.1 0.02] [--threads 1] [--maps ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hetplugin.core.dataset import ParticleDataset
from hetplugin.core.fsc import fsc, fsc_to_snr
from hetplugin.core.masks import spherical_mask
from hetplugin.core.mrc import StackReader, write_volume
from hetplugin.core.reconstruct import backproject_dataset
from hetplugin.core.simulate_subtract import simulate_subtraction
from hetplugin.core.starfile import read_particles, read_star, write_star

PX = 2.0
MAPS = ("exact consensus", "exact per class", "reconstructed consensus", "reconstructed per class")


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd``; wall / CPU seconds and peak RSS (MB) from /usr/bin/time (else wall only)."""
    stats = cwd / (log.name + ".time")
    wrapper = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(stats)] if os.path.exists("/usr/bin/time") else []
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(wrapper + cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    if wrapper:
        e, u, s, m = stats.read_text().split()[-4:]
        return dict(wall=float(e), cpu=float(u) + float(s), rss_mb=float(m) / 1024)
    return dict(wall=wall, cpu=float("nan"), rss_mb=float("nan"))


def images_by_original(star: Path, root: Path, originals: list[str]) -> np.ndarray:
    """Subtracted images in the order of the input particles (matched by rlnImageOriginalName)."""
    table = read_particles(star, root=root)
    names = [str(v) for v in table.columns["rlnImageOriginalName"].tolist()]
    where = {}
    for row, name in enumerate(names):
        i, _, path = name.partition("@")
        where[(int(i), os.path.abspath(os.path.join(root, path)))] = row
    order = []
    for name in originals:
        i, _, path = name.partition("@")
        order.append(where[(int(i), os.path.abspath(path))])
    with StackReader(table.image_path, table.image_index) as reader:
        return reader.read(np.asarray(order))


def reconstruct_map(star: Path, rows: np.ndarray, threads: int) -> np.ndarray:
    """FSC-weighted reconstruction of ``rows`` at their poses (what a refinement at the true poses gives)."""
    torch.set_num_threads(threads)
    ds = ParticleDataset(read_particles(star))
    halves = [rows[0::2], rows[1::2]]
    bps = [backproject_dataset(ds, h) for h in halves]
    maps = [bp.reconstruct().numpy() for bp in bps]
    mask = spherical_mask(ds.box, 0.45 * ds.box, 3)
    curve = fsc(maps[0] * mask, maps[1] * mask)
    bps[0].add(bps[1])
    out = bps[0].reconstruct(fsc_to_snr(curve)).numpy()
    ds.close()
    return out


def relion_optimiser(work: Path, star: Path, ref: Path, k: int, box: int) -> Path:
    """A 1-iteration Class3D run whose optimiser.star relion_particle_subtract can read."""
    out = work / f"refine_k{k}"
    out.mkdir(exist_ok=True)
    cmd = ["relion_refine", "--i", str(star), "--o", str(out / "run"), "--ref", str(ref), "--firstiter_cc",
           "--ini_high", "10", "--K", str(k), "--iter", "1", "--skip_align", "--ctf", "--particle_diameter",
           str(int(0.9 * box * PX)), "--tau2_fudge", "4", "--pad", "2", "--sym", "C1",
           "--dont_combine_weights_via_disc", "--j", "1"]
    with open(out / "log.txt", "w") as log:
        subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, check=True)
    model = out / "run_it001_model.star"
    text = model.read_text().splitlines()
    model.write_text("\n".join(f"_rlnCurrentImageSize {box}" if line.startswith("_rlnCurrentImageSize") else line
                               for line in text) + "\n")
    return out / "run_it001_optimiser.star"


def set_relion_maps(optimiser: Path, maps: list[np.ndarray]) -> None:
    for j, vol in enumerate(maps):
        write_volume(optimiser.parent / f"run_it001_class{j + 1:03d}.mrc", vol, PX)


def with_classes(star: Path, out: Path, classes: np.ndarray) -> Path:
    blocks = read_star(star)
    blocks["particles"]["rlnClassNumber"] = np.asarray(classes, np.int64)
    write_star(out, blocks)
    return out


def head(star: Path, n: int) -> Path:
    """The first n particles of ``star`` (for the marginal throughput: fixed costs cancel)."""
    blocks = read_star(star)
    blocks["particles"] = {k: v[:n] for k, v in blocks["particles"].items()}
    out = star.with_name(star.stem + f"_first{n}.star")
    write_star(out, blocks)
    return out


def marginal(full: dict, small: dict, n: int, n0: int, key: str) -> float:
    """Images per second of the work beyond the first n0 images (startup and map preparation cancel)."""
    dt = full[key] - small[key]
    return (n - n0) / dt if dt > 0 else float("nan")


def fixed_cost(full: dict, small: dict, n: int, n0: int, key: str) -> float:
    """Seconds a run costs beyond its images at the marginal rate (start-up, preparation, output)."""
    return full[key] - n / marginal(full, small, n, n0, key)


def loop_rate(log: Path) -> float:
    """Our batch loop's images/s, from the log's last line 'subtract: wrote ... (N particles, T s, R images/s)'."""
    found = re.findall(r"particles, [0-9.]+ s, ([0-9.]+) images/s\)", log.read_text())
    return float(found[-1]) if found else float("nan")


def run_case(work: Path, n: int, box: int, snr: float, threads: int, seed: int, relion: bool,
             device: str = "cpu", which: tuple[str, ...] = MAPS) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n== SNR {snr}: simulating {n} particles, box {box} ...", flush=True)
    tr = simulate_subtraction(work / "sim", n_particles=n, box=box, pixel_size_A=PX, snr=snr, seed=seed, n_states=2,
                              closed_fraction=0.3, write_class_numbers=False)
    ideal = tr.kept + tr.noise
    kept_norm, rest_norm = np.linalg.norm(tr.kept), np.linalg.norm(tr.rest)
    tr.kept = tr.rest = tr.noise = None          # 800 MB each at 50000 particles of box 64
    weights = np.bincount(tr.states, minlength=2) / n
    star = tr.star
    star_cls = with_classes(star, work / "particles_classes.star", tr.states + 1)
    star_one = with_classes(star, work / "particles_class1.star", np.ones(n, np.int64))
    originals = [str(v) for v in read_star(star)["particles"]["rlnImageName"].tolist()]
    maps = {"exact consensus": [np.tensordot(weights, tr.maps, 1)], "exact per class": list(tr.maps)}
    if any(name.startswith("reconstructed") for name in which):
        t0 = time.perf_counter()
        maps["reconstructed consensus"] = [reconstruct_map(star, np.arange(n), threads)]
        maps["reconstructed per class"] = [reconstruct_map(star, np.flatnonzero(tr.states == s), threads)
                                           for s in range(2)]
        print(f"   reconstructed the consensus and 2 class maps at the true poses in {time.perf_counter() - t0:.0f} s")
    maps = {name: maps[name] for name in which}
    write_volume(work / "mask.mrc", tr.mask, PX)
    rows = []
    optimisers = {}
    if relion:
        few = min(n, 1000)          # the optimiser only carries the model: the particles come with --data
        optimisers = {k: relion_optimiser(work, head(s, few) if few < n else s, tr.paths["consensus"], k, box)
                      for k, s in ((1, star_one), (2, star_cls)) if any(len(maps[m]) == k for m in maps)}
    n0 = max(1, n // 5)
    for name, vols in maps.items():
        k = len(vols)
        for j, vol in enumerate(vols):
            write_volume(work / f"map_{j + 1}.mrc", vol, PX)
        tag = name.replace(" ", "_")
        ours_star = star_cls if k > 1 else star
        row = dict(snr=snr, map=name, n=n, n0=n0)
        for size, particles in ((n, ours_star), (n0, head(ours_star, n0))):
            out = work / f"ours_{tag}_{size}"
            cmd = [sys.executable, "-m", "hetplugin.core", "subtract", "--particles", str(particles), "--map",
                   *[str(work / f"map_{j + 1}.mrc") for j in range(k)], "--mask", str(work / "mask.mrc"),
                   "--mask-meaning", "keep", "--out", str(out), "--threads", str(threads), "--device", device]
            row["ours" if size == n else "ours0"] = timed(cmd, work, work / f"{out.name}.log")
        row["ours_loop"] = loop_rate(work / f"ours_{tag}_{n}.log")
        x = images_by_original(work / f"ours_{tag}_{n}" / "particles_subtracted.star", work, originals)
        row.update(ours_res=np.linalg.norm(x - ideal) / kept_norm, ours_res_rest=np.linalg.norm(x - ideal) / rest_norm)
        if relion:
            opt = optimisers[k]
            set_relion_maps(opt, vols)
            relion_star = star_cls if k > 1 else star_one
            for size, particles in ((n, relion_star), (n0, head(relion_star, n0))):
                rout = work / f"relion_{tag}_{size}"
                shutil.rmtree(rout, ignore_errors=True)
                rcmd = ["relion_particle_subtract", "--i", str(opt), "--data", str(particles),
                        "--mask", str(work / "mask.mrc"), "--o", str(rout) + "/"]
                if threads > 1:
                    rcmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(threads),
                            "relion_particle_subtract_mpi"] + rcmd[1:]
                row["relion" if size == n else "relion0"] = timed(rcmd, work, work / f"{rout.name}.log")
            y = images_by_original(work / f"relion_{tag}_{n}" / "particles_subtracted.star", work, originals)
            row.update(relion_res=np.linalg.norm(y - ideal) / kept_norm,
                       relion_res_rest=np.linalg.norm(y - ideal) / rest_norm)
        rows.append(row)
        print_row(row)
    return rows


def print_row(r: dict) -> None:
    n, n0 = r["n"], r["n0"]

    def describe(who: str, t: dict, t0: dict, res: float, res_rest: float) -> str:
        return (f"{who}: residual {res:.3f} (/||sub|| {res_rest:.4f}); {n} images: whole run {t['wall']:.2f} s wall "
                f"({n / t['wall']:.0f} img/s), {t['cpu']:.2f} s CPU ({n / t['cpu']:.0f} img/CPU-s), peak RSS "
                f"{t['rss_mb']:.0f} MB ({t0['rss_mb']:.0f} MB for {n0}); marginal {marginal(t, t0, n, n0, 'wall'):.0f} "
                f"img/s wall, {marginal(t, t0, n, n0, 'cpu'):.0f} img/CPU-s; fixed "
                f"{fixed_cost(t, t0, n, n0, 'wall'):.2f} s wall, {fixed_cost(t, t0, n, n0, 'cpu'):.2f} s CPU")
    print(f"   {r['map']:<24} " + describe("ours", r["ours"], r["ours0"], r["ours_res"], r["ours_res_rest"])
          + f"; loop {r['ours_loop']:.0f} img/s")
    if "relion" in r:
        print(f"   {'':<24} " + describe("RELION", r["relion"], r["relion0"], r["relion_res"], r["relion_res_rest"]))
        o, q = r["ours"], r["relion"]
        print(f"   {'':<24} ours/RELION: residual x{r['ours_res'] / r['relion_res']:.3f}; throughput whole run "
              f"x{q['wall'] / o['wall']:.2f} wall, x{q['cpu'] / o['cpu']:.2f} CPU; marginal "
              f"x{ratio(r, 'wall'):.2f} wall, x{ratio(r, 'cpu'):.2f} CPU; peak memory x{o['rss_mb'] / q['rss_mb']:.2f}",
              flush=True)


def ratio(r: dict, key: str) -> float:
    n, n0 = r["n"], r["n0"]
    return marginal(r["ours"], r["ours0"], n, n0, key) / marginal(r["relion"], r["relion0"], n, n0, key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=5000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.02])
    p.add_argument("--threads", type=int, default=1, help="our torch threads = RELION's MPI ranks")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--device", default="cpu", help="device of our runs: cpu, cuda (RELION runs on the CPU)")
    p.add_argument("--maps", nargs="+", choices=MAPS, default=list(MAPS),
                   help="which maps to subtract with (the reconstructed ones cost three reconstructions)")
    a = p.parse_args()
    relion = shutil.which("relion_particle_subtract") is not None and shutil.which("relion_refine") is not None
    if not relion:
        print("relion_particle_subtract / relion_refine not found: only our figures are printed")
    tmp = None if a.work else tempfile.TemporaryDirectory()
    work = Path(a.work or tmp.name).resolve()
    print(f"torch {torch.__version__}, {a.threads} thread(s) (RELION: {a.threads} process(es)), "
          f"{os.cpu_count()} CPUs on this machine, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for snr in a.snr:
        rows += run_case(work / f"snr_{snr}", a.particles, a.box, snr, a.threads, a.seed, relion, a.device,
                         tuple(a.maps))
    print(f"\nsummary, {a.particles} particles, box {a.box}, {a.threads} thread(s) / process(es) "
          "(residual = ||X' - ideal|| / ||kept||; throughput ratios ours/RELION over the whole run and marginal "
          "= beyond the first N/5 images; img/s: marginal wall; fixed: seconds of a run beyond its images):")
    print(f"{'SNR':>6} {'map':<24} {'ours':>7} {'RELION':>7} {'whole wall':>10} {'whole CPU':>9} "
          f"{'marg. wall':>10} {'marg. CPU':>9} {'ours img/s':>10} {'RELION img/s':>12} {'ours fixed':>10} "
          f"{'RELION fixed':>12}")
    nan = float("nan")
    for r in rows:
        rel = r.get("relion")
        n, n0 = r["n"], r["n0"]
        print(f"{r['snr']:>6} {r['map']:<24} {r['ours_res']:>7.3f} {r.get('relion_res', nan):>7.3f} "
              f"{(rel['wall'] / r['ours']['wall']) if rel else nan:>10.2f} "
              f"{(rel['cpu'] / r['ours']['cpu']) if rel else nan:>9.2f} "
              f"{ratio(r, 'wall') if rel else nan:>10.2f} {ratio(r, 'cpu') if rel else nan:>9.2f} "
              f"{marginal(r['ours'], r['ours0'], n, n0, 'wall'):>10.0f} "
              f"{marginal(rel, r['relion0'], n, n0, 'wall') if rel else nan:>12.0f} "
              f"{fixed_cost(r['ours'], r['ours0'], n, n0, 'wall'):>10.2f} "
              f"{fixed_cost(rel, r['relion0'], n, n0, 'wall') if rel else nan:>12.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
