"""Projection and backprojection throughput of the core, and of RELION on the same work when installed.

Prints, per box size, projections/s and backprojections/s (images inserted into
the accumulators plus the final reconstruction), for the CPU and for CUDA when
torch sees a GPU, and the ratio to relion_project / relion_reconstruct.

    python benchmarks/bench_core.py [--boxes 64 128 256] [--threads N]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hetplugin.core.fourier import rfft2_centered
from hetplugin.core.mrc import write_stack, write_volume
from hetplugin.core.projection import project_images
from hetplugin.core.reconstruct import Backprojector
from hetplugin.core.rotations import matrix_to_euler, random_rotations
from hetplugin.core.simulate import make_class_volumes
from hetplugin.core.starfile import new_particle_table, write_particles


def n_images_for(box: int) -> int:
    return {64: 2000, 128: 500, 256: 100}.get(box, max(50, int(2000 * (64 / box) ** 2)))


def bench_ours(vol: np.ndarray, rot: np.ndarray, device: torch.device) -> tuple[float, float, np.ndarray]:
    box = vol.shape[0]
    v = torch.as_tensor(vol, device=device)
    r = torch.as_tensor(rot, dtype=torch.float32, device=device)
    batch = max(1, int(2e6 // (box * box)))
    project_images(v, r[:2])  # warm-up
    t0 = time.perf_counter()
    imgs = torch.cat([project_images(v, r[i:i + batch]) for i in range(0, len(r), batch)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_proj = time.perf_counter() - t0
    t0 = time.perf_counter()
    bp = Backprojector(box, device=device)
    for i in range(0, len(r), batch):
        bp.insert(rfft2_centered(imgs[i:i + batch])[:, bp.select], r[i:i + batch])
    bp.reconstruct()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_back = time.perf_counter() - t0
    return len(r) / t_proj, len(r) / t_back, imgs.cpu().numpy()


def bench_relion(vol: np.ndarray, rot: np.ndarray, imgs: np.ndarray, work: Path, threads: int):
    if shutil.which("relion_project") is None:
        return None
    box = vol.shape[0]
    write_volume(work / "vol.mrc", vol, 2.0)
    write_stack(work / "imgs.mrcs", imgs, 2.0)
    a, b, c = matrix_to_euler(rot)
    n = len(rot)
    table = new_particle_table(image_path=np.array([str(work / "imgs.mrcs")] * n, dtype=object),
                               image_index=np.arange(1, n + 1), pixel_size_A=2.0, image_size=box,
                               rot_deg=a, tilt_deg=b, psi_deg=c, shift_x_A=np.zeros(n), shift_y_A=np.zeros(n))
    write_particles(work / "imgs.star", table)
    t0 = time.perf_counter()
    subprocess.run(["relion_project", "--i", "vol.mrc", "--ang", "imgs.star", "--o", "rproj"], cwd=work,
                   check=True, capture_output=True)
    t_proj = time.perf_counter() - t0
    cmd = ["relion_reconstruct", "--i", "imgs.star", "--o", "rrec.mrc", "--angpix", "2"]
    if threads > 1 and shutil.which("relion_reconstruct_mpi") and shutil.which("mpirun"):
        cmd = ["mpirun", "--allow-run-as-root", "-np", str(threads), "relion_reconstruct_mpi"] + cmd[1:]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    t_back = time.perf_counter() - t0
    return n / t_proj, n / t_back


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print(f"{'box':>5} {'device':>6} {'images':>7} {'proj/s':>10} {'backproj/s':>11} "
          f"{'RELION proj/s':>14} {'RELION bp/s':>12} {'x proj':>7} {'x bp':>7}")
    for box in a.boxes:
        vol = make_class_volumes(box, 1, seed=0)[0]
        rot = random_rotations(n_images_for(box), np.random.default_rng(box))
        relion = None
        for dev in devices:
            proj, back, imgs = bench_ours(vol, rot, dev)
            if relion is None:
                with tempfile.TemporaryDirectory() as tmp:
                    relion = bench_relion(vol, rot, imgs, Path(tmp), torch.get_num_threads()) or ()
            rp, rb = relion if relion else (float("nan"), float("nan"))
            print(f"{box:>5} {dev.type:>6} {len(rot):>7} {proj:>10.1f} {back:>11.1f} {rp:>14.1f} {rb:>12.1f} "
                  f"{proj / rp:>7.2f} {back / rb:>7.2f}", flush=True)
    if not shutil.which("relion_project"):
        print("RELION not installed: ratios are nan (apt-get install relion)")


if __name__ == "__main__":
    main()
