"""Projection and backprojection throughput of the core, and of RELION on the same work when installed.

Prints, per box size, projections/s and backprojections/s (images inserted into
the accumulators plus the final reconstruction), for the CPU and for CUDA when
torch sees a GPU, and the ratio to relion_project / relion_reconstruct.

Columns: ``proj/s`` prepares the map once (pad + 3D FFT, as relion_project and the
engines do) and then slices batches; ``api proj/s`` calls ``project_images`` per
batch, which prepares the map again every call; ``backproj/s`` covers the insertion
of all images and the final reconstruction, whose seconds are also shown alone
(``final s``). RELION's rates include its start-up, image I/O and, for
relion_reconstruct, its fixed gridding-correction iterations on the padded grid,
so they favour us at small image counts and large boxes.

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

from hetplugin.core.fourier import half_plane_coords, irfft2_centered, rfft2_centered
from hetplugin.core.mrc import write_stack, write_volume
from hetplugin.core.projection import frequency_mask, prepare_volume, project_ft, project_images, slice_grid
from hetplugin.core.reconstruct import Backprojector
from hetplugin.core.rotations import matrix_to_euler, random_rotations
from hetplugin.core.simulate import make_class_volumes
from hetplugin.core.starfile import new_particle_table, write_particles


def n_images_for(box: int) -> int:
    return {64: 2000, 128: 500, 256: 100}.get(box, max(50, int(2000 * (64 / box) ** 2)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ours(vol: np.ndarray, rot: np.ndarray, device: torch.device) -> dict:
    box = vol.shape[0]
    v = torch.as_tensor(vol, device=device)
    r = torch.as_tensor(rot, dtype=torch.float32, device=device)
    batch = max(1, int(2e6 // (box * box)))
    sel = torch.as_tensor(frequency_mask(box), device=device)
    k = torch.as_tensor(half_plane_coords(box), dtype=torch.float32, device=device)[sel]
    project_images(v, r[:2])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    grid = slice_grid(prepare_volume(v))          # once per map
    imgs = []
    for i in range(0, len(r), batch):
        vals = project_ft(grid, r[i:i + batch], k)
        full = torch.zeros((len(vals), box, box // 2 + 1), dtype=vals.dtype, device=device)
        full[:, sel] = vals
        imgs.append(irfft2_centered(full, box))
    imgs = torch.cat(imgs)
    _sync(device)
    t_proj = time.perf_counter() - t0
    del grid
    t0 = time.perf_counter()
    api = torch.cat([project_images(v, r[i:i + batch]) for i in range(0, len(r), batch)])
    _sync(device)
    t_api = time.perf_counter() - t0
    if not torch.allclose(api, imgs, atol=1e-4 * float(imgs.abs().max())):
        raise RuntimeError("project_images and the prepared-once projection disagree")
    del api
    t0 = time.perf_counter()
    bp = Backprojector(box, device=device)
    for i in range(0, len(r), batch):
        bp.insert(rfft2_centered(imgs[i:i + batch])[:, bp.select], r[i:i + batch])
    _sync(device)
    t1 = time.perf_counter()
    bp.reconstruct()
    _sync(device)
    t_back = time.perf_counter() - t0
    return dict(proj=len(r) / t_proj, api=len(r) / t_api, back=len(r) / t_back,
                final_s=time.perf_counter() - t1, imgs=imgs.cpu().numpy())


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")


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
    # RELION 3.1 programs refuse optics groups without voltage and Cs, even without --ctf
    for label, value in (("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7), ("rlnAmplitudeContrast", 0.1)):
        table.optics[label] = np.full(len(table.optics["rlnOpticsGroup"]), value)
    write_particles(work / "imgs.star", table)
    t0 = time.perf_counter()
    _run(["relion_project", "--i", "vol.mrc", "--ang", "imgs.star", "--o", "rproj"], work)
    t_proj = time.perf_counter() - t0
    cmd = ["relion_reconstruct", "--i", "imgs.star", "--o", "rrec.mrc", "--angpix", "2"]
    if threads > 1 and shutil.which("relion_reconstruct_mpi") and shutil.which("mpirun"):
        cmd = ["mpirun", "--allow-run-as-root", "-np", str(threads), "relion_reconstruct_mpi"] + cmd[1:]
    t0 = time.perf_counter()
    _run(cmd, work)
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
    print(f"{'box':>5} {'device':>6} {'images':>7} {'proj/s':>9} {'api proj/s':>10} {'backproj/s':>10} "
          f"{'final s':>8} {'RELION proj/s':>13} {'RELION bp/s':>11} {'x proj':>7} {'x bp':>7}")
    for box in a.boxes:
        vol = make_class_volumes(box, 1, seed=0)[0]
        rot = random_rotations(n_images_for(box), np.random.default_rng(box))
        relion = None
        for dev in devices:
            ours = bench_ours(vol, rot, dev)
            if relion is None:
                with tempfile.TemporaryDirectory() as tmp:
                    relion = bench_relion(vol, rot, ours["imgs"], Path(tmp), torch.get_num_threads()) or ()
            rp, rb = relion if relion else (float("nan"), float("nan"))
            print(f"{box:>5} {dev.type:>6} {len(rot):>7} {ours['proj']:>9.1f} {ours['api']:>10.1f} "
                  f"{ours['back']:>10.1f} {ours['final_s']:>8.2f} {rp:>13.1f} {rb:>11.1f} "
                  f"{ours['proj'] / rp:>7.2f} {ours['back'] / rb:>7.2f}", flush=True)
    if not shutil.which("relion_project"):
        print("RELION not installed: ratios are nan (apt-get install relion)")


if __name__ == "__main__":
    main()
