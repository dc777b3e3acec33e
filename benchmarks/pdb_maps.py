"""Class maps from atomic models, for ``bench_multiclass.py --maps``.

Each PDB file's heavy atoms become Gaussians weighted by their electrons (sigma 1.2 A),
rendered at half the pixel size and Fourier-cropped to the box; every model is first
superposed on the first one over the residues of ``--superpose`` (e.g. the rigid core of
a protein whose domains move), and all are centred on the first model's centre of mass.
The maps are scaled together (the first map's maximum is 1).

Adenylate kinase, open (4AKE) and closed (1AKE), as used in the README's figures: the
CHARMM models ``adk_open.pdb`` and ``adk_closed.pdb`` ship with the MDAnalysisTests
package (``pip download --no-deps MDAnalysisTests``, then unpack ``MDAnalysisTests/data``)::

    python benchmarks/pdb_maps.py adk_open.pdb adk_closed.pdb --superpose 1-29,60-121,160-214 --out adk
    python benchmarks/bench_multiclass.py --maps adk/map_001.mrc adk/map_002.mrc --skip-relion

``--intermediates N`` adds N conformations between two models with the same atoms (a linear
morph of the superposed coordinates), e.g. three classes open / half-closed / closed::

    python benchmarks/pdb_maps.py adk_open.pdb adk_closed.pdb --superpose 1-29,60-121,160-214 \
        --intermediates 1 --out adk3
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from hetplugin.core.fourier import fftn_centered, ifftn_centered
from hetplugin.core.mrc import write_volume

ELECTRONS = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15}


def read_pdb(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heavy atoms of a PDB file: coordinates (A, 3) in A, electrons (A,), residue numbers (A,)."""
    xyz, weight, residue = [], [], []
    for line in Path(path).read_text().splitlines():
        if not line.startswith(("ATOM", "HETATM")):
            continue
        element = (line[76:78].strip() or line[12:16].strip()[0]).upper()
        if element == "H" or element not in ELECTRONS:
            continue
        xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        weight.append(ELECTRONS[element])
        residue.append(int(line[22:26]))
    if not xyz:
        raise ValueError(f"{path}: no heavy atoms found")
    return np.array(xyz), np.array(weight, float), np.array(residue)


def superpose(moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation t with moving @ R.T + t ~ fixed (least squares, Kabsch)."""
    mc, fc = moving.mean(0), fixed.mean(0)
    u, _, vt = np.linalg.svd((moving - mc).T @ (fixed - fc))
    d = np.sign(np.linalg.det(u @ vt))
    rot = (u @ np.diag([1.0, 1.0, d]) @ vt).T
    return rot, fc - mc @ rot.T


def render(xyz: np.ndarray, weight: np.ndarray, box: int, pixel_size: float, sigma: float = 1.2) -> np.ndarray:
    """Gaussian atoms on a grid of half the pixel size, Fourier-cropped to ``box``; x, y, z in A from the centre."""
    fine = 2 * box
    ax = (np.arange(fine) - fine // 2) * pixel_size / 2
    vol = np.zeros((fine,) * 3)
    g = lambda c: np.exp(-(ax - c) ** 2 / (2 * sigma ** 2))
    for (x, y, z), w in zip(xyz, weight):
        vol += w * g(z)[:, None, None] * g(y)[None, :, None] * g(x)[None, None, :]
    ft = fftn_centered(torch.as_tensor(vol + 0j), (-3, -2, -1))
    s = fine // 2 - box // 2
    ft = ft[s:s + box, s:s + box, s:s + box]
    return ifftn_centered(ft, (-3, -2, -1)).real.numpy() / 8.0


def residue_selection(spec: str | None, residues: np.ndarray) -> np.ndarray:
    if not spec:
        return np.ones(len(residues), bool)
    keep = np.zeros(len(residues), bool)
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        keep |= (residues >= int(lo)) & (residues <= int(hi or lo))
    return keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pdb", nargs="+", help="one PDB file per class")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--superpose", default=None, help="residues to superpose on (e.g. 1-29,60-121); default all")
    p.add_argument("--out", default="pdb_maps", help="output folder (map_001.mrc, ...)")
    p.add_argument("--intermediates", type=int, default=0,
                   help="conformations to add between two models with the same atoms (linear morph)")
    a = p.parse_args()
    models = [read_pdb(f) for f in a.pdb]
    ref_xyz, ref_w, ref_res = models[0]
    centre = (ref_xyz * ref_w[:, None]).sum(0) / ref_w.sum()
    placed, names = [], list(a.pdb)
    for xyz, w, res in models:
        common = np.intersect1d(res[residue_selection(a.superpose, res)], ref_res[residue_selection(a.superpose, ref_res)])
        # the residues' mean heavy-atom positions: models may differ in atom naming
        mov = np.stack([xyz[res == r].mean(0) for r in common])
        fix = np.stack([ref_xyz[ref_res == r].mean(0) for r in common])
        rot, t = superpose(mov, fix)
        placed.append((xyz @ rot.T + t - centre, w))
    if a.intermediates:
        (first, w), (last, w_last) = placed[0], placed[-1]
        if len(placed) != 2 or first.shape != last.shape or not np.array_equal(w, w_last):
            p.error("--intermediates needs exactly two models with the same atoms in the same order")
        fractions = np.arange(1, a.intermediates + 1) / (a.intermediates + 1)
        placed[1:1] = [((1 - f) * first + f * last, w) for f in fractions]
        names[1:1] = [f"{f:.2f} of the way from {a.pdb[0]} to {a.pdb[1]}" for f in fractions]
    maps = [render(xyz, w, a.box, a.pixel_size) for xyz, w in placed]
    scale = maps[0].max()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for j, m in enumerate(maps):
        write_volume(out / f"map_{j + 1:03d}.mrc", (m / scale).astype(np.float32), a.pixel_size)
        print(f"{names[j]} -> {out / f'map_{j + 1:03d}.mrc'}")


if __name__ == "__main__":
    main()
