"""Focused (masked) refinement: what the focus mask holds, and when it is too little to align on.

A focused refinement estimates each particle's pose against the masked map only (the
region is taken as rigid; its orientation may differ from the rest's). It is the
multiclass engine with one class, the focus mask as its solvent mask and a local search
around the particles' consensus poses (``multiclass --classes 1 --mask M --local-search R``);
this module holds the numpy-only checks that the protocol's form and the core's log share.

Small regions run out of signal: alignment needs the region's own projection to stand out
of the noise, and that grows with its mass. :func:`focus_report` measures the region in the
reference; :func:`focus_warnings` turns it into advice.
"""
from __future__ import annotations

import numpy as np

#: protein density, Da per cubic Angstrom (1.35 g/cm^3)
PROTEIN_DA_PER_A3 = 0.81
#: below this mass (kDa) a region gives too little signal for reliable alignment at usual SNR
SMALL_REGION_KDA = 50.0
#: below this share of the map's signal the rest dominates the images: subtract it first
SMALL_SIGNAL_FRACTION = 0.10
#: a region whose centre is further than this share of the box from the box centre is best recentred
OFF_CENTRE_FRACTION = 0.15


def focus_report(reference: np.ndarray, mask: np.ndarray, pixel_size_A: float) -> dict:
    """The focus region of ``mask`` (D, D, D, values in [0, 1]) in ``reference`` (D, D, D).

    * ``mask_volume_A3``: the mask's volume (sum of its values);
    * ``protein_volume_A3`` and ``mass_kDa``: the volume inside the mask where the reference's
      density (above the solvent level) exceeds both twice the solvent's standard deviation and 5%
      of its peak, and its mass at 0.81 Da/A^3 (solvent level and noise from the box's corners,
      outside the inscribed sphere);
    * ``signal_fraction``: the share of the map's density power (above the solvent level)
      inside the mask;
    * ``centre_offset_A``: the distance of the region's centre of density from the box centre.
    """
    ref = np.asarray(reference, dtype=np.float64)
    m = np.clip(np.asarray(mask, dtype=np.float64), 0.0, 1.0)
    if ref.shape != m.shape:
        raise ValueError(f"reference {ref.shape} and mask {m.shape} differ in shape")
    voxel = float(pixel_size_A) ** 3
    box = ref.shape[0]
    # solvent level and noise from the corners of the box (outside the inscribed sphere)
    ax = np.arange(box) - box // 2
    r2 = ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2
    solvent = ref[r2 > (0.5 * box) ** 2]
    level = float(np.median(solvent)) if solvent.size else 0.0
    noise = float(solvent.std()) if solvent.size else 0.0
    density = np.clip(ref - level, 0.0, None)
    peak = float(density.max())
    threshold = max(2.0 * noise, 0.05 * peak)
    protein = density > threshold
    inside = float((m * protein).sum()) * voxel
    centre = centre_of_mass_px(m * density)
    centre = np.zeros(3) if centre is None else centre
    power = float((density ** 2).sum())
    return dict(mask_volume_A3=float(m.sum()) * voxel, protein_volume_A3=inside,
                mass_kDa=inside * PROTEIN_DA_PER_A3 / 1000.0,
                signal_fraction=float(((m * density) ** 2).sum()) / power if power > 0 else 0.0,
                centre_offset_A=float(np.linalg.norm(centre)) * float(pixel_size_A),
                centre_A=(centre * float(pixel_size_A)).tolist(), box_A=box * float(pixel_size_A))


def centre_of_mass_px(density: np.ndarray) -> np.ndarray | None:
    """Centre of mass (x, y, z) in pixels from the box centre D // 2 of a non-negative density
    (D, D, D); None when it holds nothing."""
    density = np.asarray(density, dtype=np.float64)
    total = float(density.sum())
    if total <= 0:
        return None
    ax = np.arange(density.shape[-1]) - density.shape[-1] // 2
    z, y, x = (density.sum(axis=a) for a in ((1, 2), (0, 2), (0, 1)))
    return np.array([(x * ax).sum(), (y * ax).sum(), (z * ax).sum()]) / total


def focus_warnings(report: dict, subtracted: bool | None = None) -> list[str]:
    """Advice on a :func:`focus_report`: a small region, a weak one, an off-centre one.

    ``subtracted``: whether the particles had the signal outside the region subtracted
    (None: unknown, no advice about it)."""
    out = []
    if report["mass_kDa"] < SMALL_REGION_KDA:
        out.append(f"The focus region holds about {report['mass_kDa']:.0f} kDa of density (below "
                   f"{SMALL_REGION_KDA:.0f} kDa): a small region may give too little signal to align on, and poses "
                   "then wander and the map blurs. Widen the mask, keep the local search narrow, or check the "
                   "result against the consensus map.")
    if report["signal_fraction"] < SMALL_SIGNAL_FRACTION:
        out.append(f"The focus region holds {100 * report['signal_fraction']:.0f}% of the map's signal: the rest of "
                   "the particle dominates the images"
                   + (". Subtract the signal outside the region first (signal subtraction)." if not subtracted
                      else "."))
    elif subtracted is False:
        out.append("The particles still hold the density outside the focus region, which the masked reference "
                   "does not: it biases the alignment. Subtract it first (signal subtraction, region to keep = "
                   "this mask).")
    if report["centre_offset_A"] > OFF_CENTRE_FRACTION * report["box_A"]:
        out.append(f"The focus region's centre lies {report['centre_offset_A']:.0f} A from the box centre: its "
                   "rotations are searched about the box centre, which couples them with shifts. Recentre it "
                   "(signal subtraction with recentring, and a smaller box) before refining.")
    return out
