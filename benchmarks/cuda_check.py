"""CUDA parity: the core's kernels and jobs on the GPU against the same work on the CPU.

Prints, for projections, a reconstruction, a multiclass run and a subtraction, the
largest relative difference between the two devices (or the class accuracy of
each), and exits non-zero when a difference exceeds its tolerance. Needs a CUDA
device; run on a machine that has one:

    python benchmarks/cuda_check.py [--work DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hetplugin.core.cli import main as core_main
from hetplugin.core.mrc import StackReader, write_volume
from hetplugin.core.fourier import half_plane_coords
from hetplugin.core.masks import spherical_mask
from hetplugin.core.projection import frequency_mask, project_images
from hetplugin.core.reconstruct import Backprojector
from hetplugin.core.rotations import random_rotations
from hetplugin.core.simulate import make_class_volumes, simulate
from hetplugin.core.starfile import read_particles

FAILURES: list[str] = []


def check(name: str, value: float, tolerance: float) -> None:
    ok = value <= tolerance
    print(f"  {name}: {value:.3g} (tolerance {tolerance:g}) {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        FAILURES.append(name)


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = torch.as_tensor(a).detach().cpu().double()
    b = torch.as_tensor(b).detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def kernels() -> None:
    print("kernels (box 64, float32):")
    vol = make_class_volumes(64, 1, seed=3)[0]
    rng = np.random.default_rng(0)
    rot = random_rotations(500, rng)
    origins = rng.uniform(-3, 3, (500, 2))
    out = {}
    for dev in ("cpu", "cuda"):
        v = torch.as_tensor(vol, device=dev)
        out[dev] = project_images(v, torch.as_tensor(rot, dtype=torch.float32, device=dev),
                                  torch.as_tensor(origins, dtype=torch.float32, device=dev))
    check("projections, max |cuda - cpu| / max |cpu|", rel(out["cuda"], out["cpu"]), 1e-4)
    sel = frequency_mask(64)
    k = half_plane_coords(64)[sel]
    images = torch.fft.rfft2(out["cpu"].double()).to(torch.complex64)[:, torch.as_tensor(sel)]
    maps = {}
    for dev in ("cpu", "cuda"):
        bp = Backprojector(64, device=dev)
        bp.insert(images.to(dev), torch.as_tensor(rot, dtype=torch.float32, device=dev),
                  coords=torch.as_tensor(k, dtype=torch.float32, device=dev))
        maps[dev] = bp.reconstruct()
    check("reconstruction, max |cuda - cpu| / max |cpu|", rel(maps["cuda"], maps["cpu"]), 1e-3)


def accuracy(star: Path, truth: Path) -> float:
    found, true = read_particles(star), read_particles(truth)
    return max(float(np.mean(found.class_number == true.class_number)),
               float(np.mean(3 - found.class_number == true.class_number)))


def jobs(work: Path) -> None:
    print("multiclass (box 32, 600 particles, K=2, from one reference, no alignment):")
    sim = work / "sim"
    simulate(sim, n_particles=600, n_classes=2, box=32, pixel_size_A=4.0, snr=1.0, seed=4, heterogeneity="removal",
             with_alignment=False, log=lambda m: None)
    acc = {}
    for dev in ("cpu", "cuda"):
        t0 = time.perf_counter()
        core_main(["multiclass", "--particles", str(sim / "particles.star"), "--reference", str(sim / "consensus.mrc"),
                   "--out", str(work / f"mc_{dev}"), "--classes", "2", "--initial-lowpass", "30", "--iterations", "12",
                   "--min-class-size", "5", "--device", dev])
        acc[dev] = accuracy(work / f"mc_{dev}" / "particles.star", sim / "truth_particles.star")
        print(f"  {dev}: accuracy {acc[dev]:.3f} in {time.perf_counter() - t0:.1f} s", flush=True)
    check("multiclass accuracy on cuda below 0.95 by", max(0.0, 0.95 - acc["cuda"]), 0.0)
    check("multiclass accuracy, |cuda - cpu|", abs(acc["cuda"] - acc["cpu"]), 0.03)
    print("subtraction (the same particles, class 1's map, spherical keep mask):")
    mask = work / "mask.mrc"
    write_volume(mask, spherical_mask(32, 6, edge_px=2), 4.0)
    star = sim / "truth_particles.star"
    for dev in ("cpu", "cuda"):
        core_main(["subtract", "--particles", str(star), "--map", str(sim / "truth_class_001.mrc"), "--mask", str(mask),
                   "--mask-meaning", "keep", "--out", str(work / f"sub_{dev}"), "--device", dev])
    imgs = {}
    for dev in ("cpu", "cuda"):
        table = read_particles(work / f"sub_{dev}" / "particles_subtracted.star")
        with StackReader(table.image_path, table.image_index) as reader:
            imgs[dev] = reader.read(np.arange(len(table)))
    check("subtracted images, max |cuda - cpu| / max |cpu|", rel(imgs["cuda"], imgs["cpu"]), 1e-3)


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    kernels()
    with tempfile.TemporaryDirectory() as tmp:
        jobs(Path(a.work or tmp).resolve())
    print("all checks passed" if not FAILURES else f"FAILED: {', '.join(FAILURES)}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(run())
